"""Outlier ejection, the ejection limit and panic: time is always passed in."""

from __future__ import annotations

import pytest

from registry.agent.balancer import Balancer, BalancerEvent
from registry.agent.endpoint import Endpoint
from registry.agent.errors import ConfigError
from registry.agent.outlier import EJECTED, LIMITED, OutlierConfig, OutlierDetector
from registry.agent.policies import RoundRobin

CFG = OutlierConfig(consecutive_failures=3, base_ejection_s=1.0, max_ejection_s=8.0, max_ejection_percent=50,
                    panic_threshold_percent=50)


def ep(i: str, status: str = "passing") -> Endpoint:
    return Endpoint("svc", i, "127.0.0.1", 9000, status=status)


def detector(*ids: str, config: OutlierConfig = CFG) -> OutlierDetector:
    d = OutlierDetector(config)
    d.sync(ids)
    return d


# Each row: a sequence of (time, ok) reports for endpoint "a" (of a, b, c, d) and
# the verdicts they give.
@pytest.mark.parametrize(
    ("reports", "verdicts"),
    [
        # three failures in a row eject
        ([(0, False), (0.1, False), (0.2, False)], [None, None, EJECTED]),
        # a success in between resets the count
        ([(0, False), (0.1, False), (0.2, True), (0.3, False), (0.4, False)], [None] * 5),
        # failures while ejected (connects that started earlier) change nothing
        ([(0, False), (0, False), (0, False), (0.5, False), (0.9, False)], [None, None, EJECTED, None, None]),
        # after the ejection ends it is on probation: one failure ejects again
        ([(0, False), (0, False), (0, False), (1.0, False)], [None, None, EJECTED, EJECTED]),
        # a success on probation clears it: three failures needed again
        ([(0, False), (0, False), (0, False), (1.0, True), (1.1, False), (1.2, False), (1.3, False)],
         [None, None, EJECTED, None, None, None, EJECTED]),
    ],
)
def test_consecutive_failures(reports: list[tuple[float, bool]], verdicts: list[str | None]) -> None:
    d = detector("a", "b", "c", "d")
    assert [d.report("a", ok, now) for now, ok in reports] == verdicts


def test_ejection_time_doubles_up_to_the_cap_then_starts_over_after_a_healthy_stretch() -> None:
    d = detector("a", "b")
    now = 0.0
    lengths = []
    for _ in range(6):
        while d.report("a", False, now) != EJECTED:
            pass
        lengths.append(d.ejection_s("a", now))
        assert d.is_ejected("a", now)
        now += lengths[-1]
        assert not d.is_ejected("a", now)
    assert lengths == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    # In rotation for max_ejection_s (8 s) after the last ejection ended: the backoff starts over.
    now += 8.0
    d.report("a", True, now)
    for _ in range(3):
        verdict = d.report("a", False, now)
    assert verdict == EJECTED and d.ejection_s("a", now) == 1.0


@pytest.mark.parametrize(
    ("endpoints", "percent", "allowed"),
    [(4, 50, 2), (3, 50, 1), (2, 50, 1), (1, 50, 1), (10, 10, 1), (10, 30, 3), (3, 0, 0), (3, 100, 3)],
)
def test_max_ejection_percent(endpoints: int, percent: int, allowed: int) -> None:
    cfg = OutlierConfig(consecutive_failures=1, max_ejection_percent=percent, panic_threshold_percent=0)
    ids = [f"e{i}" for i in range(endpoints)]
    d = detector(*ids, config=cfg)
    verdicts = [d.report(i, False, 0.0) for i in ids]
    assert verdicts.count(EJECTED) == allowed
    assert verdicts.count(LIMITED) == endpoints - allowed
    assert d.ejected_count(0.0) == allowed
    assert d.limited == endpoints - allowed


@pytest.mark.parametrize(
    ("statuses", "ejected", "threshold", "healthy", "panic"),
    [
        (["passing"] * 3, [], 50, 3, False),
        (["passing", "passing", "critical"], [], 50, 2, False),
        (["passing", "critical", "critical"], [], 50, 1, True),     # 33% < 50%: route to all
        (["passing", "passing", "passing"], ["e0", "e1"], 50, 1, True),
        (["warning", "passing", "critical"], [], 50, 2, False),    # warning still takes traffic
        (["critical"] * 3, [], 0, 0, False),                       # panic disabled: nothing to route to
        (["passing", "critical", "critical", "critical"], [], 25, 1, False),  # exactly at the threshold
    ],
)
def test_selection_and_panic(statuses: list[str], ejected: list[str], threshold: int, healthy: int,
                             panic: bool) -> None:
    cfg = OutlierConfig(consecutive_failures=1, max_ejection_percent=100, panic_threshold_percent=threshold)
    endpoints = [ep(f"e{i}", s) for i, s in enumerate(statuses)]
    d = detector(*(e.id for e in endpoints), config=cfg)
    for i in ejected:
        assert d.report(i, False, 0.0) == EJECTED
    sel = d.select(endpoints, 0.1)
    assert (sel.healthy, sel.total, sel.panic) == (healthy, len(statuses), panic)
    if panic:
        assert sel.candidates == tuple(endpoints)
    else:
        assert [c.id for c in sel.candidates] == [e.id for e in endpoints
                                                  if e.routable and e.id not in ejected]


def test_sync_forgets_endpoints_that_left() -> None:
    d = detector("a", "b")
    d.report("a", False, 0)
    d.sync(["b", "c"])
    assert d.report("a", False, 0) is None  # unknown now
    assert d.max_ejected() == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"consecutive_failures": 0}, "consecutive_failures"), ({"base_ejection_s": 0}, "ejection times"),
     ({"base_ejection_s": 10, "max_ejection_s": 5}, "ejection times"), ({"max_ejection_percent": 101}, "percent"),
     ({"panic_threshold_percent": -1}, "panic_threshold")],
)
def test_config_validation(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        OutlierConfig(**kwargs).validate()  # type: ignore[arg-type]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_balancer_reroutes_ejects_and_reports_panic_loudly() -> None:
    clock = FakeClock()
    events: list[BalancerEvent] = []
    b = Balancer("svc", RoundRobin(), CFG, clock, events.append)
    a, bb, c = ep("a"), ep("b"), ep("c")
    b.update([c, a, bb])
    assert [x.id for x in b.endpoints] == ["a", "b", "c"]  # sorted: a stable order for the policy
    assert b.pick(exclude=["a"]) is not None
    assert b.pick(exclude=["a", "b", "c"]) is None
    for _ in range(3):
        b.report(a, False)
    assert [e.kind for e in events] == ["ejected"]
    assert {b.pick().id for _ in range(6)} == {"b", "c"}  # type: ignore[union-attr]
    # b fails too: the limit (50% of 3 -> 1) keeps it in, and says so.
    for _ in range(3):
        b.report(bb, False)
    assert [e.kind for e in events] == ["ejected", "limited"]
    # b and c go critical in the registry: 0 of 3 healthy -> panic, routing to all.
    b.update([a, ep("b", "critical"), ep("c", "critical")])
    assert b.pick() is not None
    assert events[-1].kind == "panic" and events[-1].detail["healthy"] == 0
    assert b.panic
    # a's ejection ends and the others recover: panic over.
    clock.now = 1.5
    b.update([a, bb, c])
    b.selection()
    assert events[-1].kind == "panic_over" and not b.panic


def test_balancer_counts_open_connections() -> None:
    b = Balancer("svc", RoundRobin(), CFG, FakeClock())
    a = ep("a")
    b.update([a])
    b.started(a)
    b.started(a)
    assert b.active == {"a": 2}
    b.update([])
    b.finished(a)
    b.finished(a)
    assert b.active == {}
