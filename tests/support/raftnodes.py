"""In-process Raft nodes that the test ticks by hand (``RaftNode(auto_tick=False)``).

For tests that must control exactly when each node runs: a stalled follower,
what leaves a node before its log is synced.  Real sockets on loopback, real
logs in the test's directory; ``ticking`` drives every node's loop.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from registry.config import NodeConfig, RaftTiming
from registry.raft.node import RaftNode, StateHolder

__all__ = ["free_ports", "hand_ticked_nodes", "tick"]


def free_ports(count: int) -> list[int]:
    """``count`` loopback ports free at the time of asking (all held at once, so they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@contextmanager
def hand_ticked_nodes(root: Path, cluster_key: str, timing: RaftTiming | None = None,
                      size: int = 3) -> Iterator[list[RaftNode]]:
    """``size`` Raft nodes of one cluster, none ticking on its own; every one stopped on exit."""
    addrs = [f"127.0.0.1:{port}" for port in free_ports(size)]
    built: list[RaftNode] = []
    try:
        for i, addr in enumerate(addrs):
            config = NodeConfig(node_id=f"n{i + 1}", data_dir=root / f"n{i + 1}", raft_addr=addr,
                                peers=tuple(a for a in addrs if a != addr), cluster_key=cluster_key,
                                raft=timing or RaftTiming())
            built.append(RaftNode(config, StateHolder(), os.urandom(16).hex(), auto_tick=False))
        yield built
    finally:
        for node in built:
            node.stop()


def tick(nodes: list[RaftNode], seconds: float) -> None:
    """Tick every node in turn, for ``seconds`` of wall time."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        for node in nodes:
            node.tick(0.002)
