"""One upstream's routing decisions: endpoint table + outlier state + policy.

The proxy and the in-process ``Resolver`` share this class, so both route
the same way.  The caller owns the loop: ``pick`` an endpoint, call
``started`` when a connection to it opens and ``finished`` when it ends, and
``report`` every connect outcome.  Whatever should be visible (an ejection,
a failure that hit the ejection limit, entering or leaving panic) goes to
the ``observer`` as a ``BalancerEvent``; the shell turns those into log
lines and metrics.

Pure apart from the injected clock (``clock()`` -> seconds, monotonic).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from registry.agent.endpoint import Endpoint
from registry.agent.outlier import EJECTED, LIMITED, OutlierConfig, OutlierDetector, Selection
from registry.agent.policies import Policy

__all__ = ["Balancer", "BalancerEvent", "Observer"]


@dataclass(frozen=True, slots=True)
class BalancerEvent:
    #: "ejected", "limited" (a failure that would eject more than allowed),
    #: "panic" (healthy share below the threshold), "panic_over".
    kind: str
    upstream: str
    endpoint: Endpoint | None = None
    detail: dict[str, Any] = field(default_factory=dict)


Observer = Callable[[BalancerEvent], None]


class Balancer:
    def __init__(self, upstream: str, policy: Policy, outlier: OutlierConfig, clock: Callable[[], float],
                 observer: Observer | None = None) -> None:
        self.upstream = upstream
        self.policy = policy
        self.outlier = OutlierDetector(outlier)
        self._clock = clock
        self._observer = observer
        self._endpoints: tuple[Endpoint, ...] = ()
        self._by_id: dict[str, Endpoint] = {}
        #: Open connections per endpoint id (least_conn and p2c read it).
        self.active: dict[str, int] = {}
        self._selection: Selection | None = None
        self._selection_valid_until: float | None = None
        self.panic = False

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return self._endpoints

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        """Replace the table (sorted by id, so policies see a stable order)."""
        self._endpoints = tuple(sorted(endpoints, key=lambda ep: ep.id))
        self._by_id = {ep.id: ep for ep in self._endpoints}
        self.outlier.sync(self._by_id)
        for gone in [i for i, n in self.active.items() if n == 0 and i not in self._by_id]:
            del self.active[gone]
        self._invalidate()
        self.selection()  # report a panic when the table changes, not at the next connection

    def _invalidate(self) -> None:
        self._selection = None

    def selection(self) -> Selection:
        now = self._clock()
        sel = self._selection
        if sel is not None and (self._selection_valid_until is None or now < self._selection_valid_until):
            return sel
        sel = self.outlier.select(self._endpoints, now)
        self._selection = sel
        self._selection_valid_until = self.outlier.next_change(now)
        if sel.panic != self.panic:
            self.panic = sel.panic
            self._emit(BalancerEvent("panic" if sel.panic else "panic_over", self.upstream, None,
                                     {"healthy": sel.healthy, "total": sel.total,
                                      "threshold_percent": self.outlier.config.panic_threshold_percent}))
        return sel

    def pick(self, exclude: Collection[str] = ()) -> Endpoint | None:
        """An endpoint for a new connection, skipping ids in ``exclude`` (already tried); None if none is left."""
        candidates: Sequence[Endpoint] = self.selection().candidates
        if exclude:
            candidates = [ep for ep in candidates if ep.id not in exclude]
        if not candidates:
            return None
        return self.policy.pick(candidates, self.active)

    def started(self, endpoint: Endpoint) -> None:
        self.active[endpoint.id] = self.active.get(endpoint.id, 0) + 1

    def finished(self, endpoint: Endpoint) -> None:
        left = self.active.get(endpoint.id, 0) - 1
        assert left >= 0, f"finished without started: {endpoint.id}"
        if left == 0 and endpoint.id not in self._by_id:
            self.active.pop(endpoint.id, None)
        else:
            self.active[endpoint.id] = left

    def report(self, endpoint: Endpoint, ok: bool) -> None:
        if ok:  # the common case, once per connection: no clock, nothing to emit
            self.outlier.succeeded(endpoint.id)
            return
        now = self._clock()
        verdict = self.outlier.report(endpoint.id, ok, now)
        if verdict == EJECTED:
            self._invalidate()
            self._emit(BalancerEvent("ejected", self.upstream, endpoint,
                                     {"ejection_s": round(self.outlier.ejection_s(endpoint.id, now), 3)}))
            self.selection()  # notice panic now, not at the next pick
        elif verdict == LIMITED:
            self._emit(BalancerEvent("limited", self.upstream, endpoint,
                                     {"max_ejected": self.outlier.max_ejected()}))

    def _emit(self, event: BalancerEvent) -> None:
        if self._observer is not None:
            self._observer(event)

    def describe(self) -> dict[str, Any]:
        """The table as /healthz shows it."""
        now = self._clock()
        sel = self.selection()
        return {
            "endpoints": [
                {"id": ep.id, "address": ep.hostport, "status": ep.status, "weight": ep.weight,
                 "ejected_s": round(self.outlier.ejection_s(ep.id, now), 3), "active": self.active.get(ep.id, 0)}
                for ep in self._endpoints
            ],
            "healthy": sel.healthy,
            "total": sel.total,
            "panic": sel.panic,
        }
