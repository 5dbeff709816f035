"""Load-balancing policies: tables of candidates, loads and the picks they give."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from registry.agent.endpoint import Endpoint
from registry.agent.errors import ConfigError
from registry.agent.policies import (
    POLICY_NAMES,
    LeastConnections,
    PowerOfTwoChoices,
    RoundRobin,
    Weighted,
    canonical_policy_name,
    make_policy,
)


def eps(*ids: str, weights: dict[str, int] | None = None) -> list[Endpoint]:
    weights = weights or {}
    return [Endpoint("svc", i, "127.0.0.1", 9000 + n, weight=weights.get(i, 1)) for n, i in enumerate(ids)]


def picks(policy: object, candidates: list[Endpoint], n: int, active: dict[str, int] | None = None) -> list[str]:
    return [policy.pick(candidates, active or {}).id for _ in range(n)]  # type: ignore[attr-defined]


def test_round_robin_cycles_in_order() -> None:
    assert picks(RoundRobin(), eps("a", "b", "c"), 7) == ["a", "b", "c", "a", "b", "c", "a"]


def test_round_robin_keeps_going_when_candidates_shrink() -> None:
    rr = RoundRobin()
    assert picks(rr, eps("a", "b", "c"), 2) == ["a", "b"]
    assert picks(rr, eps("a", "c"), 2) == ["a", "c"]


@pytest.mark.parametrize(
    ("active", "expected"),
    [
        ({"a": 3, "b": 0, "c": 5}, ["b", "b", "b"]),          # the least loaded, every time
        ({"a": 1, "b": 1, "c": 2}, ["a", "b", "a"]),          # ties rotate, never the loaded one
        ({}, ["a", "b", "c"]),                                # idle: behaves like round robin
    ],
)
def test_least_connections(active: dict[str, int], expected: list[str]) -> None:
    assert picks(LeastConnections(), eps("a", "b", "c"), 3, active) == expected


def test_p2c_prefers_the_less_loaded_of_two_and_never_the_most_loaded_of_three() -> None:
    policy = PowerOfTwoChoices(random.Random(7))
    got = Counter(picks(policy, eps("a", "b", "c"), 3000, {"a": 10, "b": 0, "c": 5}))
    # Any pair but {a, c} contains b, which wins; {a, c} goes to c.  a (the most loaded) never wins.
    assert got["a"] == 0
    assert 0.6 < got["b"] / 3000 < 0.74  # expected 2/3
    assert 0.26 < got["c"] / 3000 < 0.4  # expected 1/3


def test_p2c_is_deterministic_for_a_seed_and_spreads_when_idle() -> None:
    a = picks(PowerOfTwoChoices(random.Random(1)), eps("a", "b", "c"), 50)
    b = picks(PowerOfTwoChoices(random.Random(1)), eps("a", "b", "c"), 50)
    assert a == b
    got = Counter(picks(PowerOfTwoChoices(random.Random(3)), eps("a", "b", "c"), 3000))
    assert all(abs(got[i] - 1000) < 150 for i in "abc"), got


def test_p2c_with_one_candidate() -> None:
    assert picks(PowerOfTwoChoices(random.Random(0)), eps("a"), 3) == ["a", "a", "a"]


@pytest.mark.parametrize(
    ("weights", "window", "expected"),
    [
        ({"a": 1, "b": 1, "c": 1}, 3, ["a", "b", "c"]),
        ({"a": 5, "b": 1, "c": 1}, 7, ["a", "a", "b", "a", "c", "a", "a"]),  # nginx's smooth sequence
        ({"a": 2, "b": 1}, 6, ["a", "b", "a", "a", "b", "a"]),
    ],
)
def test_weighted_is_smooth_and_exact_per_window(weights: dict[str, int], window: int, expected: list[str]) -> None:
    policy = Weighted()
    candidates = eps(*weights, weights=weights)
    assert picks(policy, candidates, window) == expected
    got = Counter(picks(policy, candidates, window * 100))
    total = sum(weights.values())
    assert dict(got) == {i: w * window * 100 // total for i, w in weights.items()}


def test_weighted_forgets_endpoints_that_left() -> None:
    policy = Weighted()
    for n in range(50):
        policy.pick(eps(f"old{n}", "a"), {})
    assert len(policy._current) <= 4


@pytest.mark.parametrize(
    ("name", "canonical"),
    [("round_robin", "round_robin"), ("rr", "round_robin"), ("least-connections", "least_conn"),
     ("P2C", "p2c"), ("power_of_two", "p2c"), ("weighted", "weighted")],
)
def test_policy_names(name: str, canonical: str) -> None:
    assert canonical_policy_name(name) == canonical
    assert make_policy(name, random.Random(0)).name == canonical


def test_unknown_policy_names_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"unknown load-balancing policy 'fastest'.*round_robin, least_conn"):
        make_policy("fastest")
    assert POLICY_NAMES == ("round_robin", "least_conn", "p2c", "weighted")
