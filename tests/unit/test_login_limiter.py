"""Login attempts are reserved before the password check (issue #20, finding 5): concurrency cannot bypass the limit."""

from __future__ import annotations

import pytest

from registry.errors import LimitExceeded
from registry.server.acl_service import LoginLimiter

KEYS = ["user:ann", "addr:10.0.0.9"]


def limiter(now: list[float], in_flight_max: int = 2) -> LoginLimiter:
    return LoginLimiter(failures_max=5, window_s=60, block_s=30, in_flight_max=in_flight_max, clock=lambda: now[0])


@pytest.mark.parametrize(
    ("in_flight_max", "concurrent", "admitted"),
    [
        (2, 64, 2),  # one connection firing 64 guesses at once: two reach scrypt
        (8, 64, 5),  # a larger in-flight bound still stops at failures_max reservations
        (1, 1, 1),
    ],
)
def test_concurrent_attempts_are_bounded(in_flight_max: int, concurrent: int, admitted: int) -> None:
    now = [0.0]
    lim = limiter(now, in_flight_max=in_flight_max)
    passed = 0
    for _ in range(concurrent):  # every begin before any end: all of them in flight at once
        try:
            lim.begin(KEYS)
            passed += 1
        except LimitExceeded:
            pass
    assert passed == admitted


def test_reserved_attempts_count_as_failures_until_they_succeed() -> None:
    now = [0.0]
    lim = limiter(now, in_flight_max=10)
    for _ in range(5):
        lim.begin(KEYS)
    with pytest.raises(LimitExceeded):
        lim.begin(KEYS)
    for _ in range(5):
        lim.end(KEYS, ok=False)
    with pytest.raises(LimitExceeded):
        lim.begin(KEYS)
    now[0] += 31
    lim.begin(KEYS)
    lim.end(KEYS, ok=True)  # a success clears the key
    for _ in range(4):
        lim.begin(KEYS)
        lim.end(KEYS, ok=False)
    lim.begin(KEYS)


def test_a_refused_attempt_reserves_nothing() -> None:
    now = [0.0]
    lim = limiter(now, in_flight_max=1)
    lim.begin(["user:ann", "addr:a"])
    with pytest.raises(LimitExceeded):
        lim.begin(["user:bob", "addr:a"])  # the address is busy: bob's key must stay untouched
    lim.begin(["user:bob", "addr:b"])
    lim.end(["user:bob", "addr:b"], ok=True)
    lim.end(["user:ann", "addr:a"], ok=True)
    lim.begin(["user:ann", "addr:a"])
