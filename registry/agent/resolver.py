"""In-process load balancing: the agent's routing without the proxy.

A Python application that already holds a ``Client`` can pick endpoints
itself and connect directly::

    resolver = Resolver(client, policy="p2c")
    endpoint = await resolver.resolve("api")
    try:
        ... connect to endpoint.address, endpoint.port ...
        resolver.report(endpoint, ok=True)
    except OSError:
        resolver.report(endpoint, ok=False)   # counts toward outlier ejection
        endpoint = await resolver.resolve("api", exclude={endpoint.id})   # reroute

It uses the same ``Balancer`` as the proxy (policy, outlier ejection,
panic threshold), and keeps each service's table fresh with a watch that
starts at the first ``resolve`` of that service.  Every ``resolve`` must be
followed by exactly one ``report``: the pair is what least_conn and p2c
count as an open connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from registry.agent.balancer import Balancer, Observer
from registry.agent.endpoint import Endpoint
from registry.agent.errors import NoEndpoint
from registry.agent.outlier import OutlierConfig
from registry.agent.policies import canonical_policy_name, make_policy
from registry.agent.table import EndpointTable
from registry.client import Client

__all__ = ["Resolver"]

#: Services one resolver watches: each is a watch stream on the registry.
SERVICES_MAX = 1000


@dataclass
class _Service:
    table: EndpointTable
    balancer: Balancer
    listed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class Resolver:
    def __init__(self, client: Client, *, policy: str = "round_robin", outlier: OutlierConfig | None = None,
                 rng: random.Random | None = None, clock: Callable[[], float] = time.monotonic,
                 list_timeout_s: float = 5.0, observer: Observer | None = None) -> None:
        self.client = client
        self.policy = canonical_policy_name(policy)
        self.outlier = outlier or OutlierConfig()
        self.outlier.validate()
        self._rng = rng or random.Random()
        self._clock = clock
        self._list_timeout_s = list_timeout_s
        self._observer = observer
        self._services: dict[str, _Service] = {}

    def _service(self, name: str) -> _Service:
        svc = self._services.get(name)
        if svc is None:
            if len(self._services) >= SERVICES_MAX:
                raise NoEndpoint(f"resolver already watches {SERVICES_MAX} services")
            balancer = Balancer(name, make_policy(self.policy, self._rng), self.outlier, self._clock, self._observer)
            svc = _Service(EndpointTable(name), balancer)
            svc.task = asyncio.get_running_loop().create_task(self._watch(svc))
            self._services[name] = svc
        return svc

    async def _watch(self, svc: _Service) -> None:
        async for item in self.client.watch(service=svc.table.service, list_first=True):
            if svc.table.apply(item):
                svc.balancer.update(svc.table.endpoints())
            if svc.table.listed:
                svc.listed.set()

    async def resolve(self, service: str, exclude: Collection[str] = ()) -> Endpoint:
        """An endpoint of ``service``, skipping ids in ``exclude``; NoEndpoint if there is none.

        The first call for a service waits (up to ``list_timeout_s``) for its first listing.
        """
        svc = self._service(service)
        if not svc.listed.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(svc.listed.wait(), self._list_timeout_s)
            if not svc.listed.is_set():
                raise NoEndpoint(f"no listing of service {service!r} within {self._list_timeout_s:g}s "
                                 "(registry unreachable?)")
        endpoint = svc.balancer.pick(exclude)
        if endpoint is None:
            known = len(svc.balancer.endpoints)
            raise NoEndpoint(f"service {service!r}: no endpoint available ({known} known, "
                             f"{len(exclude)} excluded)")
        svc.balancer.started(endpoint)
        return endpoint

    def report(self, endpoint: Endpoint, ok: bool) -> None:
        """The outcome of using ``endpoint`` (from ``resolve``): feeds outlier ejection, ends the "connection"."""
        svc = self._services.get(endpoint.service)
        if svc is None:
            return
        svc.balancer.report(endpoint, ok)
        svc.balancer.finished(endpoint)

    def balancer(self, service: str) -> Balancer | None:
        svc = self._services.get(service)
        return None if svc is None else svc.balancer

    async def close(self) -> None:
        services, self._services = self._services, {}
        for svc in services.values():
            if svc.task is not None:
                svc.task.cancel()
        for svc in services.values():
            if svc.task is not None:
                with contextlib.suppress(BaseException):
                    await svc.task
