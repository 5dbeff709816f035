"""Whether a cluster is ready, from the status answers of its nodes (pure).

Ready means what a script waiting on ``regctl status`` needs before it
writes: a majority of the listed nodes answered, and a majority of the
listed nodes name the same leader, which itself says it leads (when it is
one of the listed nodes, else every listed node must name it).  A node that
answers but has no leader, or nodes that name different leaders (an
election in progress), do not count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Readiness", "readiness"]


@dataclass(frozen=True)
class Readiness:
    ready: bool
    #: The Raft address a majority agrees on, or None.
    leader: str | None
    #: Why not ready, in one line ("" when ready).
    reason: str


def readiness(statuses: Sequence[Mapping[str, Any]]) -> Readiness:
    """``statuses``: one per listed endpoint, as ``Client.cluster_status`` gives them."""
    total = len(statuses)
    majority = total // 2 + 1
    reachable = [s for s in statuses if s.get("reachable")]
    if len(reachable) < majority:
        return Readiness(False, None, f"{len(reachable)} of {total} node(s) reachable; a majority is {majority}")
    votes: dict[str, int] = {}
    for s in reachable:
        leader = s.get("leader")
        if leader:
            votes[str(leader)] = votes.get(str(leader), 0) + 1
    if not votes:
        return Readiness(False, None, "no node knows a leader (an election is under way, or no quorum)")
    leader, count = max(votes.items(), key=lambda kv: kv[1])
    if count < majority:
        return Readiness(False, None, f"no leader agreed on by a majority ({majority} of {total}): "
                         + ", ".join(f"{k} by {v}" for k, v in sorted(votes.items())))
    listed = [s for s in reachable if s.get("raft") == leader]
    if (listed and listed[0].get("role") != "leader") or (not listed and count < total):
        # The leader is listed but does not lead (or did not answer): writes would fail.  A leader
        # outside the listed endpoints counts only when every listed node agrees on it.
        return Readiness(False, None, f"{count} node(s) name {leader} as leader, but it does not answer as leader")
    return Readiness(True, leader, "")
