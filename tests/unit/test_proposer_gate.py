"""Writes wait for the current leader's first entry (``leader_epoch``).

A write proposed before the new leader's announcement applied would land
ahead of it, under the old (or, on a new cluster, no) state byte budget:
the CI run that let 20 x 60 KB through a 1 MiB budget.  The proposer is the
real one; a recorder stands in for Raft and commits on demand.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import msgpack
import pytest

from registry.errors import Timeout, Unavailable
from registry.fsm.commands import validate_command
from registry.server.metrics import NodeMetrics
from registry.server.proposer import Proposer, outcome_result


class Recorder:
    def __init__(self) -> None:
        self.sent: list[list[dict[str, Any]]] = []
        self._done: list[tuple[bytes, Callable[[Any, int], None]]] = []

    def submit(self, batch: bytes, done: Callable[[Any, int], None]) -> None:
        self.sent.append(msgpack.unpackb(batch))
        self._done.append((batch, done))

    def commit(self) -> None:
        done, self._done = self._done, []
        for batch, callback in done:
            callback([(True, {"revision": 1}) for _ in msgpack.unpackb(batch)], 0)

    def ops(self) -> list[str]:
        return [c.get("key", c["op"]) for batch in self.sent for c in batch]


def put(key: str) -> dict[str, Any]:
    return validate_command({"op": "key_put", "key": key, "value": "v"})


def epoch() -> dict[str, Any]:
    return validate_command({"op": "leader_epoch", "epoch": 2, "state_bytes_max": 1 << 20})


async def settle(recorder: Recorder) -> None:
    for _ in range(5):
        await asyncio.sleep(0)
        recorder.commit()


def make(recorder: Recorder, ready: Callable[[], bool], timeout_s: float = 5.0,
         leader_known: Callable[[], bool] = lambda: True) -> Proposer:
    return Proposer(recorder, asyncio.get_running_loop(), NodeMetrics(), batch_commands_max=64,
                    batch_bytes_max=1 << 20, batch_inflight_max=1, pending_max=100, timeout_s=timeout_s,
                    ready=ready, leader_known=leader_known)


def test_writes_wait_for_the_announcement_and_keep_their_order() -> None:
    async def run() -> Recorder:
        recorder = Recorder()
        announced = [False]
        proposer = make(recorder, lambda: announced[0])
        first = [proposer.propose(put(f"k/{i}"), validated=True) for i in range(3)]
        barrier = proposer.barrier_future()
        await settle(recorder)
        # Held: nothing but the barrier reached Raft, and the writes are not done.
        assert recorder.ops() == ["barrier"] and barrier.done()
        assert not any(f.done() for f in first)
        assert proposer.pending == 3
        announce = proposer.propose(epoch(), validated=True, ungated=True)
        await settle(recorder)
        assert outcome_result(announce.result())
        assert recorder.ops() == ["barrier", "leader_epoch"]
        proposer.applied()  # not ready yet: still held
        await settle(recorder)
        assert not any(f.done() for f in first)
        announced[0] = True
        # A write that arrives once ready, before the loop saw the apply, still goes after the held ones.
        late = proposer.propose(put("k/late"), validated=True)
        proposer.applied()
        await settle(recorder)
        assert all(outcome_result(f.result()) for f in [*first, late])
        proposer.close()
        return recorder

    recorder = asyncio.run(run())
    assert recorder.ops() == ["barrier", "leader_epoch", "k/0", "k/1", "k/2", "k/late"]


def test_a_held_write_that_outlives_its_deadline_fails_unavailable_unproposed() -> None:
    async def run() -> tuple[Recorder, BaseException | None]:
        recorder = Recorder()
        proposer = make(recorder, lambda: False, timeout_s=0.05)
        held = proposer.propose(put("k/0"), validated=True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while not held.done() and loop.time() < deadline:
            await asyncio.sleep(0.02)
        error = held.exception()
        proposer.close()
        return recorder, error

    recorder, error = asyncio.run(run())
    assert isinstance(error, Unavailable) and not isinstance(error, Timeout)
    assert "not proposed" in str(error)
    assert recorder.sent == []


def test_held_writes_count_toward_pending_max_and_fail_on_close() -> None:
    async def run() -> None:
        recorder = Recorder()
        proposer = make(recorder, lambda: False)
        futures = [proposer.propose(put(f"k/{i}"), validated=True) for i in range(100)]
        with pytest.raises(Exception, match="proposals pending"):
            proposer.propose(put("k/over"), validated=True)
        proposer.close()
        assert all(isinstance(f.exception(), Timeout) for f in futures)
        assert recorder.sent == []

    asyncio.run(run())


def test_with_no_leader_known_a_write_is_refused_at_once_not_held() -> None:
    # During an election or a partition there is no announcement to wait for: the client should
    # move on to another node now, not after its timeout (as pysyncobj refused such writes before).
    async def run() -> Recorder:
        recorder = Recorder()
        leader = [False]
        proposer = make(recorder, lambda: False, leader_known=lambda: leader[0])
        with pytest.raises(Unavailable, match="no raft leader"):
            proposer.propose(put("k/0"), validated=True)
        assert proposer.pending == 0
        barrier = proposer.barrier_future()  # reads are not gated: they fail or succeed in Raft
        leader[0] = True
        held = proposer.propose(put("k/1"), validated=True)
        await settle(recorder)
        assert barrier.done() and not held.done() and proposer.pending == 1
        proposer.close()
        return recorder

    recorder = asyncio.run(run())
    assert recorder.ops() == ["barrier"]
