"""Persist before you speak (#18): no Raft message leaves a node while its log holds a record not yet fsynced.

Three real ``RaftNode``s in one process on real sockets and real log files,
ticked by hand.  Every message a node hands to its socket is checked at that
moment against its own log: a vote grant or an AppendEntries success reply
sent while ``entries_dirty`` is exactly what would let a power loss forget an
entry the rest of the cluster counted.  A leader's AppendEntries may go
before the leader's own sync (its fsync runs in parallel with its
followers'), so for the leader the check is at the commit: every write is
acknowledged with the leader's log clean.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from registry.raft.node import RaftNode
from tests.support.raftnodes import hand_ticked_nodes, tick


class SpeechCheck:
    """Wraps a node's delivery: records each message type sent, and each one sent over a dirty log."""

    def __init__(self, node: RaftNode) -> None:
        self.node = node
        self.sent: dict[str, int] = {}
        self.violations: list[str] = []
        deliver = node.send_gate.deliver
        assert deliver is not None

        def checked(peer: Any, message: Any) -> Any:
            kind = message.get("type", "?") if isinstance(message, dict) else "?"
            self.sent[kind] = self.sent.get(kind, 0) + 1
            if node.wal.entries_dirty and not (kind == "append_entries" and node.is_leader()):
                self.violations.append(kind)
            return deliver(peer, message)

        node.send_gate.deliver = checked


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[RaftNode]]:
    with hand_ticked_nodes(tmp_path, "speak-test-key-0123") as built:
        yield built


def test_no_message_leaves_before_the_log_records_it_relies_on_are_synced(nodes: list[RaftNode]) -> None:
    checks = [SpeechCheck(node) for node in nodes]
    deadline = time.monotonic() + 20
    while not any(n.raft_status().role == "leader" for n in nodes):
        assert time.monotonic() < deadline, "no leader elected"
        tick(nodes, 0.05)
    leader = next(n for n in nodes if n.raft_status().role == "leader")
    done: list[int] = []
    acked_dirty: list[int] = []

    def acknowledged(outcome: Any, reason: int) -> None:
        done.append(reason)
        if leader.wal.entries_dirty:
            acked_dirty.append(len(done))

    for i in range(40):
        leader.submit(msgpack.packb([]), acknowledged)
        if i % 4 == 0:
            tick(nodes, 0.01)
    deadline = time.monotonic() + 20
    while len(done) < 40:
        assert time.monotonic() < deadline, f"only {len(done)} of 40 entries committed"
        tick(nodes, 0.02)
    assert done == [0] * 40
    assert not acked_dirty, f"writes acknowledged while the leader's log was not durable: {acked_dirty}"
    sent = {kind for check in checks for kind in check.sent}
    assert {"append_entries", "next_node_idx", "request_vote", "response_vote"} <= sent
    for check in checks:
        assert not check.violations, f"{check.node.raft_status().node} spoke over a dirty log: {check.violations}"
        assert check.node.wal.fsyncs > 0
    # Messages really waited for a sync (the gate is what kept the check above green).
    assert sum(n.send_gate.messages_held for n in nodes) > 0
