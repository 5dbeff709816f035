"""SendGate over a real RaftLog: hold while dirty, keep order, one sync per flush, nothing sent after a failure."""

from __future__ import annotations

import contextlib
import resource
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from registry.raft.log import LogWriteFailed, RaftLog
from registry.raft.send_gate import SendGate


class Wire:
    def __init__(self) -> None:
        self.sent: list[tuple[Any, Any]] = []

    def __call__(self, node: Any, message: Any) -> bool:
        self.sent.append((node, message))
        return True


def clean_log(tmp_path: Path) -> RaftLog:
    log = RaftLog(tmp_path / "log")
    log.sync()
    return log


def test_a_clean_log_sends_at_once(tmp_path: Path) -> None:
    wire = Wire()
    gate = SendGate(clean_log(tmp_path), wire)
    gate.send("a", 1)
    assert wire.sent == [("a", 1)] and gate.queued == 0


def test_a_commit_index_alone_does_not_hold_messages(tmp_path: Path) -> None:
    log = clean_log(tmp_path)
    log.setRaftCommitIndex(5)
    wire = Wire()
    SendGate(log, wire).send("a", 1)
    assert wire.sent == [("a", 1)]


def test_messages_wait_for_one_sync_and_keep_their_order(tmp_path: Path) -> None:
    log = clean_log(tmp_path)
    wire = Wire()
    gate = SendGate(log, wire)
    log.add(b"x", 1, 1)
    gate.send("a", 1)
    log.add(b"y", 2, 1)
    gate.send("b", 2)
    assert wire.sent == [] and gate.queued == 2
    fsyncs = log.fsyncs
    gate.flush()
    assert log.fsyncs == fsyncs + 1
    assert wire.sent == [("a", 1), ("b", 2)]
    # Clean again: the next goes at once; a flush with nothing to do syncs nothing.
    gate.send("c", 3)
    gate.flush()
    assert wire.sent[-1] == ("c", 3) and log.fsyncs == fsyncs + 1


def test_a_bounded_queue_flushes_on_its_own(tmp_path: Path) -> None:
    log = clean_log(tmp_path)
    wire = Wire()
    gate = SendGate(log, wire, queued_messages_max=3)
    log.add(b"x", 1, 1)
    gate.send("a", 1)
    gate.send("a", 2)
    assert wire.sent == []
    gate.send("a", 3)
    assert [m for _, m in wire.sent] == [1, 2, 3] and not log.entries_dirty


@contextlib.contextmanager
def no_file_growth_ctx() -> Iterator[None]:
    """Writes past the current end of any file fail with EFBIG (RLIMIT_FSIZE), as on a full disk."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_a_failed_log_never_releases_what_waits(tmp_path: Path) -> None:
    log = clean_log(tmp_path)
    wire = Wire()
    gate = SendGate(log, wire)
    log.add(b"x" * 8192, 1, 1)
    gate.send("a", 1)
    with no_file_growth_ctx(), pytest.raises(LogWriteFailed, match="EFBIG"):
        gate.flush()
    gate.send("b", 2)
    with pytest.raises(LogWriteFailed):
        gate.flush()  # for good, even with room again
    assert wire.sent == [] and gate.queued == 2
    assert log.failed is not None and log.entries_dirty


def test_a_message_that_needs_no_sync_goes_at_once_unless_something_waits(tmp_path: Path) -> None:
    log = clean_log(tmp_path)
    wire = Wire()
    gate = SendGate(log, wire)
    log.add(b"x", 1, 1)
    gate.send("f", "append", needs_sync=False)  # a leader's AppendEntries: its fsync runs in parallel
    assert wire.sent == [("f", "append")] and log.entries_dirty
    gate.send("f", "vote")
    gate.send("f", "append 2", needs_sync=False)  # behind the waiting vote, in order
    assert wire.sent == [("f", "append")]
    gate.flush()
    assert [m for _, m in wire.sent] == ["append", "vote", "append 2"]
