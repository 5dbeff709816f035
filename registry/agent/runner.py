"""The agent process: registration, health checks, upstream tables, proxies, HTTP.

Theory of operation
-------------------
``Agent.start`` first takes every local resource that can fail because of
the configuration (the access log file, each upstream's listener, the HTTP
listener) and raises ``ConfigError`` if one cannot be had, before it talks
to the registry at all.  Then it runs, as tasks on one event loop:

- *registration*: one lease (the configured TTL) for all local instances,
  renewed every third of the TTL; the instances are registered on it with
  the status their checks gave.  Status changes from the checks are pushed
  by this same loop (``set_status``), so registration and status never race.
  A lease the registry no longer knows (it expired while the agent could not
  reach the cluster) is replaced and the instances registered again.  Until
  the cluster answers, it retries with backoff; the proxies work meanwhile.
- *checks*: one ``CheckLoop`` per local instance with a check.  The first
  check runs before the first registration, so an instance is registered
  with a real status, not an optimistic one.
- *watches*: one per upstream (``Client.watch(service, list_first=True)``),
  feeding an ``EndpointTable``; every change replaces the ``Balancer``'s
  endpoints.  The client resumes a broken watch on another node from the
  next revision; meanwhile the table, and so the routing, stays as it was.
- *proxies*: ``UpstreamProxy`` listeners, routing by the balancers.
- *housekeeping*: flushes the access log and refreshes gauges every second.

``Agent.stop`` (SIGTERM or Ctrl-C) stops accepting, revokes the lease (the
instances go with it, in one revision) and closes everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from registry.agent.balancer import Balancer, BalancerEvent
from registry.agent.checks import CheckLoop
from registry.agent.config import AgentConfig, LocalService, Upstream
from registry.agent.errors import ConfigError
from registry.agent.intentions import IntentionsWatcher
from registry.agent.metrics import AgentMetrics
from registry.agent.policies import make_policy
from registry.agent.proxy import AccessLog, Intentions, UpstreamProxy, allow_all, os_reason
from registry.agent.table import EndpointTable
from registry.client import Client, client_ssl_context
from registry.errors import NotFound, RegistryError, Unavailable
from registry.fsm.model import NOTE_CHARS_MAX

__all__ = ["Agent", "run_agent", "configure_logging"]

log = logging.getLogger("registry.agent")

#: How often the access log is flushed and the gauges refreshed.
HOUSEKEEPING_S = 1.0
#: How long an upstream waits for the first intentions load before it shows its endpoints anyway.
INTENTIONS_FIRST_LOAD_WAIT_S = 5.0
#: How long a clean shutdown waits for the registry to revoke the lease.
REVOKE_TIMEOUT_S = 3.0
#: Backoff between attempts to register while the cluster does not answer.
REGISTER_BACKOFF_S_MIN = 0.1
REGISTER_BACKOFF_S_MAX = 2.0


@dataclass
class _Local:
    """One local instance and the status its check last settled on."""

    service: LocalService
    status: str = "passing"
    note: str = ""
    #: The registry has this status (set False by every change, True once set_status succeeds).
    reported: bool = True
    check: CheckLoop | None = None


@dataclass
class _Route:
    """One upstream: its table, balancer and proxy."""

    upstream: Upstream
    table: EndpointTable
    balancer: Balancer
    proxy: UpstreamProxy
    warned_empty: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class Agent:
    def __init__(self, config: AgentConfig, *, intentions: Intentions = allow_all,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``intentions`` is the hook for allow/deny between services (the auth issue); the default allows all."""
        config.validate()
        self.config = config
        self.metrics = AgentMetrics()
        ssl_context = None
        if config.tls_ca is not None or config.tls_cert is not None:
            # The token travels in every hello: with --tls-* it goes over TLS like any regctl command's.
            try:
                ssl_context = client_ssl_context(config.tls_ca, config.tls_cert, config.tls_key)
            except OSError as err:  # a missing file, or ssl.SSLError (an OSError) for a bad PEM
                raise ConfigError(f"cannot load TLS files (--tls-ca/--tls-cert/--tls-key): {err}") from None
        self.client = Client(list(config.endpoints), token=config.token, client_name="regctl-agent",
                             timeout_s=5.0, connect_timeout_s=0.5, shuffle=True, ssl_context=ssl_context)
        self.access_log: AccessLog | None = None
        self.locals = [_Local(svc) for svc in config.services]
        self.lease: int | None = None
        self.routes: list[_Route] = []
        #: With the default hook, intentions come from the registry (kept current by a watch).
        self.intentions_watcher: IntentionsWatcher | None = None
        if intentions is allow_all:
            self.intentions_watcher = IntentionsWatcher(self.client)
            intentions = self.intentions_watcher
        self._intentions = intentions
        self._clock = clock
        self._tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self._http: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.http_port: int | None = None

    # -- start / stop -----------------------------------------------------------------

    async def start(self) -> None:
        """Bind every listener (ConfigError if one cannot be bound), then start the background work."""
        cfg = self.config
        try:
            if cfg.access_log is not None:
                try:
                    self.access_log = AccessLog(cfg.access_log)
                except OSError as err:
                    raise ConfigError(f"cannot open access log {cfg.access_log}: {os_reason(err)}") from None
            for i, up in enumerate(cfg.upstreams):
                self.routes.append(self._route(up, i))
            for route in self.routes:
                await route.proxy.start()
            if cfg.http is not None:
                await self._start_http(*cfg.http)
            await self._check_upstreams()
        except BaseException:
            await self.stop(deregister=False)
            raise
        self._session = aiohttp.ClientSession()
        loop = asyncio.get_running_loop()
        if self.intentions_watcher is not None and self.routes:
            self._tasks.append(loop.create_task(self.intentions_watcher.run()))
        for route in self.routes:
            route.tasks.append(loop.create_task(self._watch(route)))
        self._tasks.append(loop.create_task(self._start_locals()))
        self._tasks.append(loop.create_task(self._housekeeping()))
        for route in self.routes:
            log.info("upstream %s: listening on %s (policy %s)", route.upstream.service, route.proxy.listen,
                     route.balancer.policy.name)

    async def _check_upstreams(self) -> None:
        """A misspelt upstream is a configuration error, not a proxy that refuses everything forever.

        A service exists once something registered in it (it outlives its last
        instance), so deploy order only needs one registration first.  When the
        registry cannot be asked, the agent starts anyway: it must be able to
        come up during a registry outage, and says it could not check.
        """
        for route in self.routes:
            name = route.upstream.service
            try:
                await self.client.get_service(name)
            except NotFound:
                raise ConfigError(f"upstream {name}: no such service in the registry (names are case-sensitive; "
                                  "register an instance of it first)") from None
            except Unavailable as err:
                log.warning("upstream %s: cannot check that the service exists (%s: %s); starting anyway",
                            name, err.code, err.message)
            except RegistryError as err:
                raise ConfigError(f"upstream {name}: {err.code}: {err.message}") from None

    def _route(self, up: Upstream, index: int) -> _Route:
        rng = random.Random(None if self.config.seed is None else self.config.seed + index)
        balancer = Balancer(up.service, make_policy(up.policy, rng), self.config.outlier, self._clock,
                            self._on_balancer_event)
        proxy = UpstreamProxy(up.service, up.host, up.port, balancer, source=self.config.source,
                              metrics=self.metrics, access_log=self.access_log,
                              connect_timeout_s=self.config.connect_timeout_s,
                              attempts=self.config.connect_attempts, intentions=self._intentions)
        return _Route(up, EndpointTable(up.service), balancer, proxy)

    async def stop(self, deregister: bool = True) -> None:
        for route in self.routes:
            for task in route.tasks:
                task.cancel()
        for task in self._tasks:
            task.cancel()
        for task in [*self._tasks, *(t for r in self.routes for t in r.tasks)]:
            with contextlib.suppress(BaseException):
                await task
        for route in self.routes:
            await route.proxy.close()
        if deregister and self.lease is not None:
            lease, self.lease = self.lease, None
            try:
                await self.client.call("lease_revoke", {"lease": lease}, timeout_s=REVOKE_TIMEOUT_S)
                log.info("deregistered: lease %d revoked", lease)
            except RegistryError as err:
                log.warning("could not revoke lease %d (%s: %s): the instances go when it expires in %gs",
                            lease, err.code, err.message, self.config.ttl_ms / 1000)
            self.metrics.registered.set(0)
        if self._http is not None:
            await self._http.cleanup()
            self._http = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        await self.client.close()
        if self.access_log is not None:
            self.access_log.close()
            self.access_log = None

    # -- local instances ------------------------------------------------------------------

    async def _start_locals(self) -> None:
        """First check of every local instance, then the checks and the registration loop."""
        if not self.locals:
            return
        loop = asyncio.get_running_loop()
        for local in self.locals:
            spec = local.service.check
            if spec is None:
                self._set_status_gauge(local)
                continue

            async def on_change(status: str, note: str, local: _Local = local) -> None:
                self._status_changed(local, status, note)

            local.check = CheckLoop(spec, on_change, self._session, label=f"{local.service.name}/{local.service.id}")
        await asyncio.gather(*(local.check.check_once() for local in self.locals if local.check is not None))
        for local in self.locals:
            if local.check is not None:
                self._tasks.append(loop.create_task(local.check.run(first_delay_s=local.check.spec.interval_s)))
        await self._registration()

    def _status_changed(self, local: _Local, status: str, note: str) -> None:
        local.status = status
        local.note = note[:NOTE_CHARS_MAX]
        local.reported = False
        self._set_status_gauge(local)
        self._wake.set()

    def _set_status_gauge(self, local: _Local) -> None:
        for status in ("passing", "warning", "critical"):
            self.metrics.check_status.labels(local.service.name, local.service.id, status).set(
                1 if status == local.status else 0)

    async def _register_all(self) -> None:
        ttl_ms = self.config.ttl_ms
        lease = await self.client.lease_grant(ttl_ms)
        for local in self.locals:
            svc = local.service
            await self.client.register(svc.name, svc.id, svc.address, svc.port, meta=dict(svc.meta),
                                       tags=svc.tags, weight=svc.weight, status=local.status, lease=lease)
            local.reported = True
        self.lease = lease
        self.metrics.registered.set(1)
        log.info("registered %s on lease %d (ttl %gs)",
                 ", ".join(f"{x.service.name}/{x.service.id} ({x.status})" for x in self.locals), lease,
                 ttl_ms / 1000)

    async def _push_statuses(self) -> None:
        for local in self.locals:
            if local.reported:
                continue
            status = local.status
            svc = local.service
            await self.client.call("set_status", {"service": svc.name, "id": svc.id, "status": status,
                                                  "note": local.note}, timeout_s=self._attempt_s())
            if local.status == status:
                local.reported = True

    def _attempt_s(self) -> float:
        # One attempt must not outlast the renewal interval: a hung node would
        # otherwise hold the lease's whole countdown.
        return max(0.5, self.config.ttl_ms / 3000)

    async def _registration(self) -> None:
        """Register, then renew the lease and push status changes, forever (see the module docstring)."""
        interval_s = self.config.ttl_ms / 3000
        backoff_s = REGISTER_BACKOFF_S_MIN
        next_renewal = 0.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                if self.lease is None:
                    await self._register_all()
                    next_renewal = loop.time() + interval_s
                if loop.time() >= next_renewal:
                    await self.client.call("lease_keepalive", {"lease": self.lease}, timeout_s=self._attempt_s())
                    self.metrics.keepalives.labels("ok").inc()
                    next_renewal = loop.time() + interval_s
                await self._push_statuses()
                backoff_s = REGISTER_BACKOFF_S_MIN
            except NotFound as err:
                # The lease (or an instance) is gone: it expired while we could not reach the cluster.
                log.warning("registration lost (%s); registering again", err.message)
                self.metrics.keepalives.labels("lost").inc()
                self.metrics.registered.set(0)
                self.lease = None
                continue
            except RegistryError as err:
                self.metrics.keepalives.labels("failed").inc()
                log.warning("registry: %s: %s; retrying in %.1fs", err.code, err.message, backoff_s)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, REGISTER_BACKOFF_S_MAX)
                continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, next_renewal - loop.time()))

    # -- upstreams ---------------------------------------------------------------------------

    async def _watch(self, route: _Route) -> None:
        service = route.upstream.service
        watcher = self.intentions_watcher
        if watcher is not None:
            # Proxies refuse every connection until intentions are loaded (fail closed), so the
            # upstream shows no endpoints until then: a client that waits for healthy endpoints
            # is not refused for a race.  Bounded, so an agent whose token may not read
            # intentions still shows its upstreams (and logs why it refuses).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(watcher.loaded.wait(), INTENTIONS_FIRST_LOAD_WAIT_S)
        async for item in self.client.watch(service=service, list_first=True, progress_ms=1000):
            changed = route.table.apply(item)
            self.metrics.watch_revision.labels(service).set(route.table.revision)
            if changed:
                endpoints = route.table.endpoints()
                route.balancer.update(endpoints)
                self.metrics.prune(service, {ep.id for ep in endpoints} | set(route.balancer.active))
                log.info("upstream %s: %d endpoint(s) at revision %d: %s", service, len(endpoints),
                         route.table.revision, ", ".join(f"{ep.id}={ep.hostport}({ep.status})" for ep in endpoints))
                route.warned_empty = False
            if route.table.listed and not len(route.table) and not route.warned_empty:
                route.warned_empty = True
                log.warning("upstream %s: no instances registered (yet); connections to %s are refused until "
                            "some appear", service, route.proxy.listen)

    def _on_balancer_event(self, event: BalancerEvent) -> None:
        ep = event.endpoint
        if event.kind == "ejected" and ep is not None:
            self.metrics.endpoint(event.upstream, ep.id).ejections.inc()
            log.warning("upstream %s: ejected %s (%s) for %gs after connect failures", event.upstream, ep.id,
                        ep.hostport, event.detail.get("ejection_s", 0))
        elif event.kind == "limited" and ep is not None:
            self.metrics.ejections_limited.labels(event.upstream).inc()
            log.warning("upstream %s: %s (%s) keeps failing but %d endpoint(s) are already ejected "
                        "(max_ejection_percent): keeping it", event.upstream, ep.id, ep.hostport,
                        event.detail.get("max_ejected", 0))
        elif event.kind == "panic":
            self.metrics.panic.labels(event.upstream).set(1)
            log.error("upstream %s: PANIC: %d of %d endpoint(s) healthy, below %d%%: routing to all endpoints",
                      event.upstream, event.detail["healthy"], event.detail["total"],
                      event.detail["threshold_percent"])
        elif event.kind == "panic_over":
            self.metrics.panic.labels(event.upstream).set(0)
            log.warning("upstream %s: panic over: %d of %d endpoint(s) healthy", event.upstream,
                        event.detail["healthy"], event.detail["total"])

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_S)
            if self.access_log is not None:
                self.access_log.flush()
            for route in self.routes:
                self._refresh_gauges(route)

    def _refresh_gauges(self, route: _Route) -> None:
        service = route.upstream.service
        sel = route.balancer.selection()
        now = self._clock()
        ejected = sum(1 for ep in route.balancer.endpoints if route.balancer.outlier.is_ejected(ep.id, now))
        unroutable = sum(1 for ep in route.balancer.endpoints if not ep.routable)
        self.metrics.endpoints.labels(service, "total").set(sel.total)
        self.metrics.endpoints.labels(service, "healthy").set(sel.healthy)
        self.metrics.endpoints.labels(service, "ejected").set(ejected)
        self.metrics.endpoints.labels(service, "critical").set(unroutable)
        self.metrics.panic.labels(service).set(1 if sel.panic else 0)

    # -- HTTP -----------------------------------------------------------------------------------

    async def _start_http(self, host: str, port: int) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics_handler)
        app.router.add_get("/healthz", self._healthz_handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        self._http = runner
        site = web.TCPSite(runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as err:
            raise ConfigError(f"cannot listen on --http {host}:{port}: {os_reason(err)}") from None
        addresses = runner.addresses
        self.http_port = int(addresses[0][1]) if addresses else port

    async def _metrics_handler(self, request: web.Request) -> web.Response:
        for route in self.routes:
            self._refresh_gauges(route)
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    def describe(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "source": self.config.source,
            "registry": self.client.endpoint,
            "registered": self.lease is not None,
            "lease": self.lease,
            "instances": [
                {"service": x.service.name, "id": x.service.id, "address": f"{x.service.address}:{x.service.port}",
                 "status": x.status, "reported": x.reported, "note": x.note}
                for x in self.locals
            ],
            "upstreams": [
                {"service": r.upstream.service, "listen": r.proxy.listen, "policy": r.balancer.policy.name,
                 "revision": r.table.revision, "listed": r.table.listed, **r.balancer.describe()}
                for r in self.routes
            ],
        }

    async def _healthz_handler(self, request: web.Request) -> web.Response:
        return web.json_response(self.describe())


class _JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"))


def configure_logging(fmt: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


async def _serve(config: AgentConfig, intentions: Intentions, ready: Callable[[Agent], None] | None) -> None:
    agent = Agent(config, intentions=intentions)
    await agent.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if ready is not None:
        ready(agent)
    try:
        await stop.wait()
        log.info("stopping")
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await agent.stop()


def run_agent(config: AgentConfig, *, intentions: Intentions = allow_all,
              ready: Callable[[Agent], None] | None = None) -> None:
    """Run the agent in the foreground until SIGTERM or SIGINT (ConfigError if it cannot start)."""
    import uvloop

    configure_logging(config.log_format, config.log_level)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve(config, intentions, ready))
