"""Persist before you speak: Raft messages wait until the log records they rely on are durable.

``SendGate`` sits between pysyncobj and the wire.  While the log holds a
record that is not yet fsynced (``RaftLog.entries_dirty``), every outgoing
message is queued, and once one is queued every later one queues behind it,
so peers see messages in the order pysyncobj sent them.  ``flush`` makes the
log durable with one ``sync()`` (one fdatasync for everything appended since
the last) and then delivers the queue.  The node flushes around each poll of
its sockets (``registry/raft/node.py``), so an AppendEntries success reply,
the leader's AppendEntries and a vote grant leave only after what they
acknowledge is on disk.  A message sent while the log is clean (a
heartbeat, a reply that appended nothing) goes out at once.

One exception, from the Raft thesis (10.2.1): a leader's AppendEntries need
not wait for the leader's own fsync, so the leader's and the followers'
fsyncs run in parallel instead of in series.  What must hold is that the
leader counts its own copy toward a commit only once it is durable, and the
node guarantees that by syncing before pysyncobj's commit check (see
``RaftNode._onTick``).  A follower may then hold an entry its leader loses
in a crash; that entry was never committed, and Raft repairs it as any
uncommitted entry.

If the sync fails (``LogWriteFailed``), the queue is never delivered: the
node exits (see docs/durability.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from registry.raft.transport import RaftTransport

__all__ = ["SendGate", "GatedTransport", "Journal", "QUEUED_MESSAGES_MAX"]

#: Messages queued before the gate flushes on its own instead of waiting for the poll: a tick
#: that sends more than this (a leader with many followers catching up) pays for one more fsync
#: rather than holding an unbounded queue.
QUEUED_MESSAGES_MAX = 4096

Deliver = Callable[[Any, Any], Any]


class Journal(Protocol):
    @property
    def entries_dirty(self) -> bool: ...

    def sync(self) -> None: ...


class SendGate:
    """Holds Raft messages while the journal has records that are not durable (see the module docstring)."""

    def __init__(self, journal: Journal, deliver: Deliver | None = None,
                 queued_messages_max: int = QUEUED_MESSAGES_MAX) -> None:
        assert queued_messages_max >= 1
        self._journal = journal
        #: The transport's own send; set once the transport exists (pysyncobj builds it after the journal).
        self.deliver = deliver
        self._queue: list[tuple[Any, Any]] = []
        self._queued_messages_max = queued_messages_max
        #: Messages that waited for a sync, and flushes that synced (for tests and status).
        self.messages_held = 0
        self.flushes_synced = 0

    @property
    def queued(self) -> int:
        return len(self._queue)

    def send(self, node: Any, message: Any, *, needs_sync: bool = True) -> bool:
        """Send now if nothing waits and the journal is clean (or ``needs_sync`` is off), else queue.

        ``needs_sync=False``: the message relies on nothing in the log (a leader's
        AppendEntries, see the module docstring); it still queues behind anything waiting,
        so a peer sees messages in the order they were sent.
        """
        if self._queue or (needs_sync and self._journal.entries_dirty):
            self._queue.append((node, message))
            self.messages_held += 1
            if len(self._queue) >= self._queued_messages_max:
                self.flush()
            return True
        assert self.deliver is not None
        return bool(self.deliver(node, message))

    def flush(self) -> None:
        """Sync the journal if it has records to make durable, then deliver the queue in order.

        Raises ``LogWriteFailed`` from the sync; then nothing is delivered and the queue stays.
        """
        if self._journal.entries_dirty:
            self._journal.sync()
            self.flushes_synced += 1
        if not self._queue:
            return
        queue, self._queue = self._queue, []
        deliver = self.deliver
        assert deliver is not None
        for node, message in queue:
            deliver(node, message)


class GatedTransport(RaftTransport):
    """``RaftTransport`` whose ``send`` goes through the node's ``send_gate`` (every Raft message does).

    A leader's AppendEntries is marked as not needing the sync (see the module docstring).
    """

    def __init__(self, syncObj: Any, selfNode: Any, otherNodes: Any) -> None:
        self._gate: SendGate = syncObj.send_gate
        self._gate.deliver = super().send
        super().__init__(syncObj, selfNode, otherNodes)

    def send(self, node: Any, message: Any) -> bool:
        leader_append = (isinstance(message, dict) and message.get("type") == "append_entries"
                         and self._syncObj._isLeader())
        return self._gate.send(node, message, needs_sync=not leader_append)
