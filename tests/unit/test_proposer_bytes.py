"""A batch is capped in bytes as well as in commands (issue #20, finding 2).

Before, 2,048 commands of up to a 1 MiB frame each could make one Raft entry
(2 GiB).  The proposer here is the real one; what it hands to Raft is kept
and committed by a recorder that answers every command with success.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest

from registry.config import NodeConfig
from registry.errors import InvalidArgument
from registry.fsm.commands import validate_command
from registry.server.metrics import NodeMetrics
from registry.server.proposer import Proposer


class Recorder:
    """Keeps each batch it is given; ``commit`` answers them all (one success per command)."""

    def __init__(self) -> None:
        self.batches: list[bytes] = []
        self._done: list[tuple[bytes, Callable[[Any, int], None]]] = []

    def submit(self, batch: bytes, done: Callable[[Any, int], None]) -> None:
        self.batches.append(batch)
        self._done.append((batch, done))

    def commit(self) -> None:
        done, self._done = self._done, []
        for batch, callback in done:
            callback([(True, {"revision": 1}) for _ in msgpack.unpackb(batch)], 0)


def put(i: int, value_chars: int) -> dict[str, Any]:
    return validate_command({"op": "key_put", "key": f"k/{i}", "value": "v" * value_chars})


@pytest.mark.parametrize(
    ("value_chars", "count", "bytes_max", "commands_max"),
    [
        (60_000, 40, 256 << 10, 2048),  # bytes bind: four 60 KB commands per batch
        (10, 300, 256 << 10, 64),  # the command count binds
        (60_000, 3, 32 << 10, 2048),  # each command alone is over the cap: sent one per batch
        (1_000, 1, 4096, 2048),
    ],
)
def test_batches_stay_under_the_byte_cap(value_chars: int, count: int, bytes_max: int, commands_max: int) -> None:
    async def run() -> Recorder:
        loop = asyncio.get_running_loop()
        recorder = Recorder()
        proposer = Proposer(recorder, loop, NodeMetrics(), batch_commands_max=commands_max,
                            batch_bytes_max=bytes_max, batch_inflight_max=1, pending_max=10_000, timeout_s=5.0)
        futures = [proposer.propose(put(i, value_chars), validated=True) for i in range(count)]
        while not all(f.done() for f in futures):
            await asyncio.sleep(0)
            recorder.commit()
        assert all(f.result()[0] for f in futures)
        proposer.close()
        return recorder

    recorder = asyncio.run(run())
    sent = [msgpack.unpackb(b) for b in recorder.batches]
    # Every command proposed once, in order, and the bytes are what msgpack makes of the list.
    assert [c["key"] for batch in sent for c in batch] == [f"k/{i}" for i in range(count)]
    for raw, batch in zip(recorder.batches, sent, strict=True):
        assert raw == msgpack.packb(batch, use_bin_type=True)
        assert len(batch) <= commands_max
        assert len(batch) == 1 or len(raw) <= bytes_max + 5  # + the array header


@pytest.mark.parametrize(
    ("frame_bytes_max", "batch_bytes_max", "ok"),
    [
        (1 << 20, 16 << 20, True),
        (1 << 20, 1 << 20, True),  # one frame's command fits
        (1 << 20, (1 << 20) - 1, False),
        (64 << 20, 128 << 20, True),
        (1 << 20, (128 << 20) + 1, False),  # an entry must stay well inside RaftWireLimits.message_bytes_max
    ],
)
def test_batch_bytes_max_relations(frame_bytes_max: int, batch_bytes_max: int, ok: bool) -> None:
    config = NodeConfig(node_id="n1", data_dir=Path("/nonexistent"), raft_addr="127.0.0.1:7101", peers=(),
                        dev=True, frame_bytes_max=frame_bytes_max, batch_bytes_max=batch_bytes_max)
    if ok:
        config.validate()
    else:
        with pytest.raises(InvalidArgument, match="batch_bytes_max"):
            config.validate()
