"""``regctl status``'s exit code: ready only when a majority answers and agrees on a leader."""

from __future__ import annotations

from typing import Any

import pytest

from cli.readiness import readiness

A, B, C = "127.0.0.1:7101", "127.0.0.1:7102", "127.0.0.1:7103"


def node(raft: str, role: str, leader: str | None) -> dict[str, Any]:
    return {"reachable": True, "raft": raft, "role": role, "leader": leader}


DOWN: dict[str, Any] = {"reachable": False}


@pytest.mark.parametrize(
    ("statuses", "ready", "leader"),
    [
        ([node(A, "leader", A), node(B, "follower", A), node(C, "follower", A)], True, A),
        # One node down: still a majority.
        ([node(A, "leader", A), node(B, "follower", A), DOWN], True, A),
        # The leader down and the others have not noticed yet: they name it, it does not answer.
        ([DOWN, node(B, "follower", A), node(C, "follower", A)], False, None),
        # Two of three down.
        ([node(A, "leader", A), DOWN, DOWN], False, None),
        # Everyone answers, nobody knows a leader (election).
        ([node(A, "candidate", None), node(B, "follower", None), node(C, "follower", None)], False, None),
        # Split opinions: no majority for either.
        ([node(A, "leader", A), node(B, "leader", B), node(C, "follower", None)], False, None),
        # A majority names A but A says it is a follower now.
        ([node(A, "follower", None), node(B, "follower", A), node(C, "follower", A)], False, None),
        # Only one endpoint listed, a follower whose leader is not listed: every listed node agrees.
        ([node(B, "follower", A)], True, A),
        # Two listed, both agree on an unlisted leader.
        ([node(B, "follower", A), node(C, "follower", A)], True, A),
        # Two listed, one down, the leader unlisted: a majority of two is two.
        ([node(B, "follower", A), DOWN], False, None),
        ([], False, None),
    ],
)
def test_readiness(statuses: list[dict[str, Any]], ready: bool, leader: str | None) -> None:
    r = readiness(statuses)
    assert (r.ready, r.leader) == (ready, leader)
    assert bool(r.reason) != ready
