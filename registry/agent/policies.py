"""Load-balancing policies: pick one endpoint from a non-empty list of candidates.

Pure: no I/O, no clock.  A policy sees the candidates the balancer already
filtered (routable, not ejected, not yet tried by this connection) and the
number of connections open to each endpoint (``active``, by endpoint id).
Randomness is injected (``random.Random``) so tests are deterministic.

- ``round_robin``: each endpoint in turn.
- ``least_conn``: fewest open connections; ties go round robin, so an idle
  upstream still spreads evenly.
- ``p2c`` (power of two choices): two distinct random candidates, the one
  with fewer open connections wins (ties to the first drawn).  Nearly as
  good as least_conn at avoiding a loaded endpoint, without every agent
  herding onto the same "least loaded" one.
- ``weighted``: smooth weighted round robin (nginx's): over any window of
  ``sum(weights)`` picks, each endpoint gets exactly its weight's share, and
  picks of a heavy endpoint are interleaved, not bursty.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Protocol

from registry.agent.endpoint import Endpoint
from registry.agent.errors import ConfigError

__all__ = [
    "Policy",
    "RoundRobin",
    "LeastConnections",
    "PowerOfTwoChoices",
    "Weighted",
    "POLICY_NAMES",
    "make_policy",
    "canonical_policy_name",
]


class Policy(Protocol):
    name: str

    def pick(self, candidates: Sequence[Endpoint], active: Mapping[str, int]) -> Endpoint:
        """One of ``candidates`` (never empty)."""
        ...


class RoundRobin:
    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def pick(self, candidates: Sequence[Endpoint], active: Mapping[str, int]) -> Endpoint:
        assert candidates, "pick needs at least one candidate"
        chosen = candidates[self._next % len(candidates)]
        self._next += 1
        return chosen


class LeastConnections:
    name = "least_conn"

    def __init__(self) -> None:
        self._next = 0

    def pick(self, candidates: Sequence[Endpoint], active: Mapping[str, int]) -> Endpoint:
        assert candidates, "pick needs at least one candidate"
        n = len(candidates)
        start = self._next % n
        self._next += 1
        best = candidates[start]
        best_active = active.get(best.id, 0)
        for i in range(1, n):
            ep = candidates[(start + i) % n]
            load = active.get(ep.id, 0)
            if load < best_active:
                best, best_active = ep, load
        return best


class PowerOfTwoChoices:
    name = "p2c"

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def pick(self, candidates: Sequence[Endpoint], active: Mapping[str, int]) -> Endpoint:
        assert candidates, "pick needs at least one candidate"
        if len(candidates) == 1:
            return candidates[0]
        i, j = self._rng.sample(range(len(candidates)), 2)
        a, b = candidates[i], candidates[j]
        return b if active.get(b.id, 0) < active.get(a.id, 0) else a


class Weighted:
    name = "weighted"

    def __init__(self) -> None:
        #: Current weight of each endpoint id (the "smooth" state); ids that
        #: are no longer candidates are dropped, so it stays bounded by the table.
        self._current: dict[str, int] = {}

    def pick(self, candidates: Sequence[Endpoint], active: Mapping[str, int]) -> Endpoint:
        assert candidates, "pick needs at least one candidate"
        total = 0
        best: Endpoint | None = None
        best_weight = 0
        for ep in candidates:
            weight = max(1, ep.weight)
            current = self._current.get(ep.id, 0) + weight
            self._current[ep.id] = current
            total += weight
            if best is None or current > best_weight:
                best, best_weight = ep, current
        assert best is not None
        self._current[best.id] = best_weight - total
        if len(self._current) > 2 * len(candidates):
            keep = {ep.id for ep in candidates}
            self._current = {k: v for k, v in self._current.items() if k in keep}
        return best


_ALIASES = {
    "round_robin": "round_robin",
    "rr": "round_robin",
    "least_conn": "least_conn",
    "least_connections": "least_conn",
    "p2c": "p2c",
    "power_of_two": "p2c",
    "power_of_two_choices": "p2c",
    "weighted": "weighted",
}

#: Canonical names, in the order the help lists them.
POLICY_NAMES = ("round_robin", "least_conn", "p2c", "weighted")


def canonical_policy_name(name: str) -> str:
    """The canonical name of a policy or alias; ConfigError naming the choices otherwise."""
    canonical = _ALIASES.get(name.strip().lower().replace("-", "_"))
    if canonical is None:
        raise ConfigError(f"unknown load-balancing policy {name!r}: choose one of {', '.join(POLICY_NAMES)}")
    return canonical


def make_policy(name: str, rng: random.Random | None = None) -> Policy:
    canonical = canonical_policy_name(name)
    if canonical == "round_robin":
        return RoundRobin()
    if canonical == "least_conn":
        return LeastConnections()
    if canonical == "p2c":
        return PowerOfTwoChoices(rng if rng is not None else random.Random())
    return Weighted()
