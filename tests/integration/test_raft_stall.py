"""A follower whose Raft thread was busy must not depose a healthy leader.

Three real ``RaftNode``s in one process, on real sockets, ticked by hand
(``auto_tick=False``) so the test decides exactly when each node runs: a
follower that does not tick for longer than the election timeout stands for
one whose Raft thread spent that long writing a snapshot or applying a big
batch, while the leader kept sending it heartbeats.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from registry.config import RaftTiming
from registry.raft.node import RaftNode
from tests.support.raftnodes import hand_ticked_nodes, tick

#: A peer silent for connect_timeout_s is disconnected (its unread heartbeats are then lost): longer
#: than the stall here, which is longer than any election timeout.
TIMING = RaftTiming(connect_timeout_s=5.0)


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[RaftNode]]:
    with hand_ticked_nodes(tmp_path, "stall-test-key", TIMING) as built:
        yield built


def _leader(nodes: list[RaftNode], timeout_s: float = 20.0) -> RaftNode:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        tick(nodes, 0.05)
        leaders = [n for n in nodes if n.raft_status().role == "leader"]
        if len(leaders) == 1 and all(n.raft_status().leader is not None for n in nodes):
            return leaders[0]
    raise AssertionError("no leader elected")


def test_a_follower_back_from_a_long_tick_reads_the_heartbeats_before_it_elects(nodes: list[RaftNode]) -> None:
    leader = _leader(nodes)
    stalled = next(n for n in nodes if n is not leader)
    others = [n for n in nodes if n is not stalled]
    # Everyone in step first, then the stalled node sits out longer than any election timeout
    # while the leader keeps sending it heartbeats.
    tick(nodes, 0.3)
    term = stalled.raft_status().term
    tick(others, TIMING.election_timeout_max_s + 0.4)
    stalled.tick(0.0)
    after = stalled.raft_status()
    assert after.role == "follower", f"the stalled follower became a {after.role}"
    assert after.term == term
    # And the cluster carries on with the same leader and term.
    tick(nodes, 0.5)
    assert leader.raft_status().role == "leader"
    assert {n.raft_status().term for n in nodes} == {term}
