"""Passive outlier ejection and the panic threshold.

Theory of operation
-------------------
The proxy reports the outcome of every connect attempt (``report``).  An
endpoint whose connects fail ``consecutive_failures`` times in a row is
*ejected*: no connection is routed to it until its ejection ends.  The n-th
ejection in a row lasts ``base_ejection_s * 2**(n-1)``, capped at
``max_ejection_s``, so a dead endpoint costs one failed connect per growing
interval, not one per request.  The count of ejections in a row starts over
once the endpoint stayed in rotation for ``max_ejection_s`` after its last
ejection ended.

An endpoint whose ejection just ended is on probation: a single failed
connect ejects it again (for longer), a single success clears it.  A failed
connect reported for an ejected endpoint (a connect that started before the
ejection) changes nothing.

At most ``max_ejection_percent`` of the known endpoints (at least one) are
ejected at once: a failure that would eject more is counted and reported
as ``limited`` instead.  That bounds the damage of a client-side problem
(this agent's own network) that makes every endpoint look dead.

*Panic*: when the healthy share (routable in the registry and not ejected)
drops below ``panic_threshold_percent``, the agent routes to every known
endpoint, healthy or not, and says so (``Selection.panic``; the balancer
turns it into a log line and a metric).  Below that share, the few healthy
endpoints would take the whole load and fall over too; spreading it and
letting connect failures reroute is the lesser harm.  0 disables panic.

Pure: time is always passed in (``now``, seconds on any monotonic clock).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from registry.agent.endpoint import Endpoint
from registry.agent.errors import ConfigError

__all__ = ["OutlierConfig", "OutlierDetector", "Selection", "EJECTED", "LIMITED"]

#: ``report`` outcomes.
EJECTED = "ejected"
LIMITED = "limited"

#: Ejections longer than an hour would keep a recovered endpoint out for
#: longer than any operator would wait for it; the backoff stops here.
_EJECTION_S_LIMIT = 3600.0


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    #: Connect failures in a row that eject an endpoint.
    consecutive_failures: int = 3
    #: First ejection's length; each further one in a row doubles it.
    base_ejection_s: float = 1.0
    #: Longest ejection.
    max_ejection_s: float = 30.0
    #: Most of the endpoints that may be ejected at once (at least one).
    max_ejection_percent: int = 50
    #: Below this healthy share, route to every endpoint (and report it).
    panic_threshold_percent: int = 50

    def validate(self) -> None:
        if not 1 <= self.consecutive_failures <= 1000:
            raise ConfigError("outlier consecutive_failures must be 1..1000")
        if not 0 < self.base_ejection_s <= self.max_ejection_s <= _EJECTION_S_LIMIT:
            raise ConfigError(
                f"outlier ejection times need 0 < base_ejection <= max_ejection <= {_EJECTION_S_LIMIT:g}s"
            )
        if not 0 <= self.max_ejection_percent <= 100:
            raise ConfigError("outlier max_ejection_percent must be 0..100")
        if not 0 <= self.panic_threshold_percent <= 100:
            raise ConfigError("outlier panic_threshold_percent must be 0..100")


@dataclass(frozen=True, slots=True)
class Selection:
    """Where connections may go now."""

    candidates: tuple[Endpoint, ...]
    healthy: int
    total: int
    panic: bool


class _State:
    __slots__ = ("ejected_until", "ejections", "failures", "probation")

    def __init__(self) -> None:
        self.failures = 0
        self.ejections = 0
        self.ejected_until: float | None = None
        self.probation = False


class OutlierDetector:
    def __init__(self, config: OutlierConfig) -> None:
        config.validate()
        self.config = config
        self._states: dict[str, _State] = {}
        #: Failures that would have ejected but hit max_ejection_percent.
        self.limited = 0

    def sync(self, ids: Iterable[str]) -> None:
        """Track exactly these endpoint ids (the table changed); forget the others."""
        keep = set(ids)
        for gone in [i for i in self._states if i not in keep]:
            del self._states[gone]
        for new in keep:
            self._states.setdefault(new, _State())

    def is_ejected(self, endpoint_id: str, now: float) -> bool:
        st = self._states.get(endpoint_id)
        return st is not None and st.ejected_until is not None and now < st.ejected_until

    def ejected_count(self, now: float) -> int:
        return sum(1 for st in self._states.values() if st.ejected_until is not None and now < st.ejected_until)

    def max_ejected(self) -> int:
        if self.config.max_ejection_percent == 0:
            return 0
        return max(1, len(self._states) * self.config.max_ejection_percent // 100)

    def next_change(self, now: float) -> float | None:
        """The earliest time an ejection ends (after ``now``), if any."""
        ends = [st.ejected_until for st in self._states.values()
                if st.ejected_until is not None and st.ejected_until > now]
        return min(ends) if ends else None

    def succeeded(self, endpoint_id: str) -> None:
        """A connect succeeded: the failure count starts over, probation ends (``report(id, True, now)``)."""
        st = self._states.get(endpoint_id)
        if st is not None:
            st.failures = 0
            st.probation = False

    def report(self, endpoint_id: str, ok: bool, now: float) -> str | None:
        """Record one connect outcome; ``EJECTED`` or ``LIMITED`` when a failure crosses the threshold."""
        if ok:
            self.succeeded(endpoint_id)
            return None
        st = self._states.get(endpoint_id)
        if st is None:
            return None  # not (or no longer) in the table
        if st.ejected_until is not None and now < st.ejected_until:
            return None
        st.failures += 1
        threshold = 1 if st.probation else self.config.consecutive_failures
        if st.failures < threshold:
            return None
        if self.ejected_count(now) >= self.max_ejected():
            self.limited += 1
            return LIMITED
        if st.ejected_until is not None and now - st.ejected_until >= self.config.max_ejection_s:
            st.ejections = 0  # it stayed healthy long enough: start the backoff over
        st.ejections += 1
        length_s = min(self.config.base_ejection_s * 2 ** min(st.ejections - 1, 30), self.config.max_ejection_s)
        st.ejected_until = now + length_s
        st.failures = 0
        st.probation = True
        return EJECTED

    def ejection_s(self, endpoint_id: str, now: float) -> float:
        """Seconds left on this endpoint's ejection (0 if not ejected)."""
        st = self._states.get(endpoint_id)
        if st is None or st.ejected_until is None:
            return 0.0
        return max(0.0, st.ejected_until - now)

    def select(self, endpoints: Sequence[Endpoint], now: float) -> Selection:
        total = len(endpoints)
        healthy = tuple(ep for ep in endpoints if ep.routable and not self.is_ejected(ep.id, now))
        panic = total > 0 and len(healthy) * 100 < self.config.panic_threshold_percent * total
        return Selection(tuple(endpoints) if panic else healthy, len(healthy), total, panic)
