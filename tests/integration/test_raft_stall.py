"""A follower whose Raft thread was busy must not depose a healthy leader.

Three real ``RaftNode``s in one process, on real sockets, ticked by hand
(``auto_tick=False``) so the test decides exactly when each node runs: a
follower that does not tick for longer than the election timeout stands for
one whose Raft thread spent that long writing a snapshot or applying a big
batch, while the leader kept sending it heartbeats.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from registry.config import NodeConfig, RaftTiming
from registry.raft.node import RaftNode, StateHolder


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


#: A peer silent for connect_timeout_s is disconnected (its unread heartbeats are then lost): longer
#: than the stall here, which is longer than any election timeout.
TIMING = RaftTiming(connect_timeout_s=5.0)


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[RaftNode]]:
    addrs = [f"127.0.0.1:{port}" for port in _free_ports(3)]
    built: list[RaftNode] = []
    try:
        for i, addr in enumerate(addrs):
            config = NodeConfig(node_id=f"n{i + 1}", data_dir=tmp_path / f"n{i + 1}", raft_addr=addr,
                                peers=tuple(a for a in addrs if a != addr), cluster_key="stall-test-key",
                                raft=TIMING)
            built.append(RaftNode(config, StateHolder(), os.urandom(16).hex(), auto_tick=False))
        yield built
    finally:
        for node in built:
            node.stop()


def _tick(nodes: list[RaftNode], seconds: float) -> None:
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        for node in nodes:
            node.tick(0.002)


def _leader(nodes: list[RaftNode], timeout_s: float = 20.0) -> RaftNode:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _tick(nodes, 0.05)
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
    _tick(nodes, 0.3)
    term = stalled.raft_status().term
    _tick(others, TIMING.election_timeout_max_s + 0.4)
    stalled.tick(0.0)
    after = stalled.raft_status()
    assert after.role == "follower", f"the stalled follower became a {after.role}"
    assert after.term == term
    # And the cluster carries on with the same leader and term.
    _tick(nodes, 0.5)
    assert leader.raft_status().role == "leader"
    assert {n.raft_status().term for n in nodes} == {term}
