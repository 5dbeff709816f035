"""The Consul HTTP API listener (aiohttp): a thin shell over the node's ops, reads and watch hub.

Every request becomes the native ops it means, through the same paths as the
binary API: ``RegistryAPI.handle`` for writes (so the state machine authorizes
them at apply time with the caller's token), ``RegistryAPI.reader`` for reads
(read barrier unless ``?stale``), ``AclService.before`` for the per-request
check.  The pure parts (shapes, parameters, indexes) are in the sibling
modules; this file only moves bytes and waits.

A blocking query (``?index=N`` equal to its answer's current index) is a
watcher on the hub with the query's selector: it costs nothing until an
applied event matches, then the answer is recomputed from local state and
served if its index moved; otherwise it waits on, until ``?wait`` (plus
jitter) runs out and the same answer goes back with the same index.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

from registry.client import Client
from registry.errors import (
    BadRequest,
    Conflict,
    NotFound,
    NotLeader,
    PermissionDenied,
    RegistryError,
    Unauthenticated,
)
from registry.fsm import model
from registry.fsm.acl import hash_secret
from registry.fsm.state import RegistryState
from registry.fsm.watch import Selector, WatchHub
from registry.raft.node import StateHolder
from registry.server.api import CURRENT_AUTH, RegistryAPI
from registry.server.consul import catalog, kv, params, writes
from registry.server.consul.params import Query
from registry.server.consul.stats import ConsulStats
from registry.server.consul.tracking import AnswerMemo, ChangeTracker, candidate_index

if TYPE_CHECKING:
    from registry.server.acl_service import AclService

__all__ = ["ConsulHTTP", "HTTP_STATUS_BY_CODE"]

log = logging.getLogger("registry.server.consul")

#: Our error codes as Consul's clients expect them: ACL failures are 403 whatever the cause.
HTTP_STATUS_BY_CODE: Final = {
    "BAD_REQUEST": 400,
    "UNKNOWN_OP": 400,
    "INVALID_NAME": 400,
    "INVALID_ARGUMENT": 400,
    "LIMIT_EXCEEDED": 429,
    "NOT_FOUND": 404,
    "CONFLICT": 409,
    "UNAUTHENTICATED": 403,
    "PERMISSION_DENIED": 403,
    "UNAVAILABLE": 503,
    "NOT_LEADER": 503,
    "TIMEOUT": 504,
}

#: A forwarded lease keepalive (a check update on a follower) waits this long for the leader.
FORWARD_TIMEOUT_S: Final = 5.0
#: On stop, requests still running after the blocking queries were released get this long.
SHUTDOWN_S: Final = 2.0
#: X-Consul-KnownLeader may be this old (Raft is asked at most this often).
LEADER_CHECK_S: Final = 0.1

_READ: Final = params.COMMON_PARAMS | params.BLOCKING_PARAMS
_SERVICE_READ: Final = _READ | {"tag", "passing"}
_KV_READ: Final = _READ | {"recurse", "keys", "separator", "raw"}
_KV_WRITE: Final = params.COMMON_PARAMS | {"cas", "flags"}
_KV_DELETE: Final = params.COMMON_PARAMS | {"cas", "recurse"}
_WRITE: Final = params.COMMON_PARAMS | {"replace-existing-checks"}
_CHECK_WRITE: Final = params.COMMON_PARAMS | {"note"}

#: A computed answer: (body, candidate index, found?); not found is Consul's 404 with an index.
Answer = tuple[Any, int, bool]
Compute = Callable[[RegistryState, str], Answer]

#: Answers kept for the current revision (see ConsulHTTP._computed_locked): distinct questions
#: asked between two applied batches; past it an answer is computed per request again.
ANSWERS_CACHED_MAX: Final = 10_000


@dataclass(frozen=True, slots=True)
class _Computed:
    """One answer as sent: its bytes (JSON, or the raw value), candidate index, found, digest."""

    body: bytes
    candidate: int
    found: bool
    digest: bytes


@dataclass(frozen=True, slots=True)
class _Read:
    """What one read needs: how to authorize it, what wakes it, how to compute it."""

    key: str
    acl_op: str
    acl_args: dict[str, Any]
    selector: Selector
    compute: Compute
    raw: bool = False


class ConsulHTTP:
    def __init__(
        self,
        api: RegistryAPI,
        holder: StateHolder,
        hub: WatchHub,
        tracker: ChangeTracker,
        site: catalog.Site,
        *,
        leader: Callable[[], str | None],
        leader_api: Callable[[], str | None],
        acl: AclService | None = None,
        stats: ConsulStats | None = None,
    ) -> None:
        self._api = api
        self.stats = stats if stats is not None else ConsulStats()
        self._holder = holder
        self._hub = hub
        self.tracker = tracker
        self.site = site
        self._leader = leader
        self._leader_api = leader_api
        self._acl = acl
        self.memo = AnswerMemo()
        self._leader_known = False
        self._leader_checked_at = -LEADER_CHECK_S
        #: This revision's answers by (query, token), and the (state, revision, tracked) they are for.
        self._answers: dict[tuple[str, str], _Computed] = {}
        self._answers_stamp: tuple[int, int, int] = (0, -1, -1)
        #: The wake-up events of the blocking queries waiting now: stop releases them all.
        self._waiting: set[asyncio.Event] = set()
        self._stopping = False
        self._runner: web.AppRunner | None = None
        self.app = web.Application(client_max_size=writes.BODY_BYTES_MAX)
        route = self.app.router
        route.add_get("/v1/agent/self", self._agent_self)
        route.add_get("/v1/status/leader", self._status_leader)
        route.add_get("/v1/status/peers", self._status_peers)
        route.add_get("/v1/catalog/datacenters", self._datacenters)
        route.add_get("/v1/catalog/services", self._catalog_services)
        route.add_get("/v1/catalog/service/{name}", self._catalog_service)
        route.add_get("/v1/health/service/{name}", self._health_service)
        route.add_get("/v1/health/checks/{name}", self._health_checks)
        route.add_get("/v1/health/state/{state}", self._health_state)
        route.add_put("/v1/agent/service/register", self._register)
        route.add_put("/v1/agent/service/deregister/{id}", self._deregister)
        for status, path in (("passing", "pass"), ("warning", "warn"), ("critical", "fail")):
            route.add_put(f"/v1/agent/check/{path}/{{check}}", self._check_setter(status))
        route.add_put("/v1/agent/check/update/{check}", self._check_update)
        route.add_get("/v1/kv/{key:.*}", self._kv_get)
        route.add_put("/v1/kv/{key:.*}", self._kv_put)
        route.add_delete("/v1/kv/{key:.*}", self._kv_delete)

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self, addresses: Sequence[tuple[str, int]], ssl_context: ssl.SSLContext | None = None) -> None:
        """Listen on each (host, port), bound to exactly that host; over TLS with ``ssl_context``."""
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        for host, port in addresses:
            await web.TCPSite(self._runner, host, port, reuse_address=True, shutdown_timeout=SHUTDOWN_S,
                              ssl_context=ssl_context).start()

    @property
    def waiting(self) -> int:
        """Blocking queries waiting now."""
        return len(self._waiting)

    async def stop(self) -> None:
        # A blocking query may wait ten minutes: answer each one now (its current answer), then close.
        self._stopping = True
        for woken in self._waiting:
            woken.set()
        if self._runner is not None:
            await self._runner.cleanup()

    # -- plumbing ---------------------------------------------------------------------------------

    def _query(self, request: web.Request, accepts: frozenset[str]) -> tuple[Query, dict[str, list[str]]]:
        multi: dict[str, list[str]] = {}
        for name, value in request.query.items():
            multi.setdefault(name, []).append(value)
        return params.parse_query(multi, accepts, datacenter=self.site.datacenter)

    def _secret(self, request: web.Request, query: Query) -> str:
        """The token: X-Consul-Token, then Authorization: Bearer, then ?token= (Consul's order)."""
        secret = request.headers.get("X-Consul-Token", "")
        if not secret:
            auth = request.headers.get("Authorization", "")
            secret = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        return secret or query.token or ""

    def _principal(self, secret: str) -> str:
        if self._acl is None:
            return ""
        CURRENT_AUTH.set(hash_secret(secret) if secret else None)
        return hash_secret(secret) if secret else ""

    async def _authorize(self, request: web.Request, principal: str, op: str, args: dict[str, Any]) -> None:
        if self._acl is None:
            return
        try:
            await self._acl.before(op, args, principal)
        except (Unauthenticated, PermissionDenied) as err:
            self._acl.denied(op, args, principal, request.remote or "unknown", err)
            raise

    async def _op(self, request: web.Request, principal: str, op: str, args: dict[str, Any]) -> Any:
        """One native op, authorized as on the binary API."""
        await self._authorize(request, principal, op, args)
        _, body = await self._api.handle(op, args)
        return body

    def _known_leader(self) -> bool:
        # Asking Raft costs far more than an answer; a thousand woken queries ask within a few ms.
        now = time.monotonic()
        if now - self._leader_checked_at >= LEADER_CHECK_S:
            self._leader_known = self._leader() is not None
            self._leader_checked_at = now
        return self._leader_known

    def _headers(self, index: int) -> dict[str, str]:
        return {
            "X-Consul-Index": str(index),
            "X-Consul-KnownLeader": "true" if self._known_leader() else "false",
            # We do not track the time since the leader was last heard; 0 is what a leader reports.
            "X-Consul-LastContact": "0",
        }

    def _json(self, body: Any, index: int, request: web.Request, status: int = 200) -> web.Response:
        indent = 4 if "pretty" in request.query else None
        return web.Response(text=json.dumps(body, indent=indent), status=status, content_type="application/json",
                            headers=self._headers(index))

    @staticmethod
    def _error(err: RegistryError) -> web.Response:
        status = HTTP_STATUS_BY_CODE.get(err.code, 500)
        return web.Response(text=f"{err.code}: {err.message}\n", status=status, content_type="text/plain")

    async def _guarded(self, work: Callable[[], Any]) -> web.Response:
        try:
            response: web.Response = await work()
            return response
        except RegistryError as err:
            return self._error(err)

    # -- reads and blocking queries ---------------------------------------------------------------

    def _computed(self, read: _Read, principal: str) -> tuple[int, _Computed]:
        """(state revision, the answer), taking the state lock."""
        with self._holder.lock:
            return self._computed_locked(self._holder.state, read, principal)

    def _computed_locked(self, state: RegistryState, read: _Read, principal: str) -> tuple[int, _Computed]:
        """The answer at the state's revision, computed and encoded once per revision.

        A change wakes every blocking query on it at once; a thousand of them asking the same
        question get one computation and one encoding, not a thousand.
        """
        stamp = (id(state), state.revision, self.tracker.revision)
        if stamp != self._answers_stamp:
            self._answers.clear()
            self._answers_stamp = stamp
        key = (read.key, principal)
        answer = self._answers.get(key)
        if answer is None:
            body, candidate, found = read.compute(state, principal)
            data = str(body).encode("utf-8") if read.raw else json.dumps(body).encode("utf-8")
            answer = _Computed(data, candidate, found, hashlib.blake2b(data, digest_size=16).digest())
            if len(self._answers) < ANSWERS_CACHED_MAX:
                self._answers[key] = answer
        return state.revision, answer

    def _settle(self, read: _Read, principal: str, answer: _Computed) -> int:
        # Per token: with ACLs, two tokens can see different answers to the same question.
        return self.memo.settle(f"{read.key}|{principal}", answer.digest, answer.candidate)

    async def _serve_read(self, request: web.Request, query: Query, read: _Read) -> web.Response:
        principal = self._principal(self._secret(request, query))
        consistency = "stale" if query.stale else "linearizable"
        await self._authorize(request, principal, read.acl_op, {**read.acl_args, "consistency": consistency})
        # The reader calls this under the state lock, after the read barrier unless ?stale.
        reader = self._api.reader(lambda state, _: self._computed_locked(state, read, principal), set())
        _, (revision, answer) = await reader({"consistency": consistency})
        index = self._settle(read, principal, answer)
        if query.index and query.index == index:
            answer, index = await self._block(request, query, read, principal, revision, index)
        return self._respond(request, read, answer, index)

    def _respond(self, request: web.Request, read: _Read, answer: _Computed, index: int) -> web.Response:
        if not answer.found:
            return web.Response(status=404, headers=self._headers(index))
        if read.raw:
            return web.Response(body=answer.body, headers=self._headers(index),
                                content_type="application/octet-stream")
        if "pretty" in request.query:
            return self._json(json.loads(answer.body), index, request)
        return web.Response(body=answer.body, content_type="application/json", headers=self._headers(index))

    async def _block(self, request: web.Request, query: Query, read: _Read, principal: str, revision: int,
                     index: int) -> tuple[_Computed, int]:
        """Wait until the answer's index moves past ``index`` or the wait runs out; the answer then."""
        loop = asyncio.get_running_loop()
        wait_s = query.wait_s + random.uniform(0.0, query.wait_s / params.WAIT_JITTER_DIVISOR)
        deadline = loop.time() + wait_s
        woken = asyncio.Event()
        watcher = self._hub.subscribe(read.selector, revision + 1, woken.set)
        self._waiting.add(woken)
        self.stats.waiting = len(self._waiting)
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining > 0 and not self._stopping:
                    try:
                        async with asyncio.timeout(remaining):
                            await woken.wait()
                    except TimeoutError:
                        pass
                if woken.is_set():
                    self.stats.wakeups += 1
                woken.clear()
                # The events themselves are not needed: the answer is recomputed from the state.
                watcher.take_chunks(1 << 62)
                if watcher.resync_reason is not None:
                    watcher.resynced(self._hub.revision)
                if self._acl is not None:
                    # A token revoked while the query waited is refused now, not at the next request.
                    await self._authorize(request, principal, read.acl_op,
                                          {**read.acl_args, "consistency": "stale"})
                _, answer = self._computed(read, principal)
                new_index = self._settle(read, principal, answer)
                if new_index != index or loop.time() >= deadline or self._stopping:
                    return answer, new_index
        finally:
            self._waiting.discard(woken)
            self.stats.waiting = len(self._waiting)
            self._hub.unsubscribe(watcher)

    def _services_read(self, key: str, compute: Compute) -> _Read:
        return _Read(key, "service_list", {}, Selector("prefix", ""), compute)

    def _visible(self, state: RegistryState, principal: str, resource: str) -> bool:
        return self._acl is None or state.acl_may(principal, "read", resource, int(time.time() * 1000))

    def _instances(self, state: RegistryState, name: str) -> list[dict[str, Any]]:
        try:
            instances: list[dict[str, Any]] = state.get_service(name)["instances"]
        except NotFound:
            return []
        return instances

    def _all_instances(self, state: RegistryState, principal: str) -> list[tuple[str, list[dict[str, Any]]]]:
        return [(s["name"], self._instances(state, s["name"])) for s in state.list_services()
                if self._visible(state, principal, "service:" + s["name"])]

    # -- endpoints: status and agent --------------------------------------------------------------

    async def _agent_self(self, request: web.Request) -> web.Response:
        async def work() -> web.Response:
            query, _ = self._query(request, params.COMMON_PARAMS)
            principal = self._principal(self._secret(request, query))
            await self._authorize(request, principal, "status", {})
            revision = self._holder.state.revision
            return self._json(catalog.agent_self(self.site, revision, self._api.info.node_id), max(revision, 1),
                              request)
        return await self._guarded(work)

    async def _status_leader(self, request: web.Request) -> web.Response:
        async def work() -> web.Response:
            self._query(request, params.COMMON_PARAMS)
            return self._json(self._leader() or "", max(self._holder.state.revision, 1), request)
        return await self._guarded(work)

    async def _status_peers(self, request: web.Request) -> web.Response:
        async def work() -> web.Response:
            self._query(request, params.COMMON_PARAMS)
            peers = sorted({self._api.info.raft_addr, *self._api.info.api_by_raft})
            return self._json(peers, max(self._holder.state.revision, 1), request)
        return await self._guarded(work)

    async def _datacenters(self, request: web.Request) -> web.Response:
        async def work() -> web.Response:
            self._query(request, params.COMMON_PARAMS)
            return self._json([self.site.datacenter], 1, request)
        return await self._guarded(work)

    # -- endpoints: catalog and health ------------------------------------------------------------

    async def _catalog_services(self, request: web.Request) -> web.Response:
        async def work() -> web.Response:
            query, _ = self._query(request, _READ)

            def compute(state: RegistryState, principal: str) -> Answer:
                services = self._all_instances(state, principal)
                revisions = (i["mod_revision"] for _, insts in services for i in insts)
                candidate = candidate_index(revisions, self.tracker.any_service_mark, state.revision,
                                            self.tracker.revision)
                return catalog.catalog_services(services), candidate, True

            return await self._serve_read(request, query, self._services_read("catalog/services", compute))
        return await self._guarded(work)

    def _service_read(self, kind: str, name: str, query: Query,
                      shape: Callable[[list[dict[str, Any]]], Any]) -> _Read:
        model.check_name("service", name)
        tags, passing = query.tags, query.passing

        def compute(state: RegistryState, principal: str) -> Answer:
            selected = catalog.select_instances(self._instances(state, name), tags, passing)
            candidate = candidate_index((i["mod_revision"] for i in selected), self.tracker.service_mark(name),
                                        state.revision, self.tracker.revision)
            return shape(selected), candidate, True

        key = f"{kind}/{name}?" + "&".join(f"tag={t}" for t in sorted(tags)) + ("&passing" if passing else "")
        return _Read(key, "service_get", {"name": name}, Selector("service", name), compute)

    async def _catalog_service(self, request: web.Request) -> web.Response:
        async def work() -> web.Response:
            query, _ = self._query(request, _SERVICE_READ)
            if query.passing:
                raise BadRequest("?passing is a /v1/health/service parameter")
            read = self._service_read("catalog", request.match_info["name"], query,
                                      lambda sel: [catalog.catalog_service_entry(self.site, i) for i in sel])
            return await self._serve_read(request, query, read)
        return await self._guarded(work)

    async def _health_service(self, request: web.Request) -> web.Response:
        async def work() -> web.Response:
            query, _ = self._query(request, _SERVICE_READ)
            note = self.tracker.note
            read = self._service_read(
                "health", request.match_info["name"], query,
                lambda sel: [catalog.health_entry(self.site, i, note(i["service"], i["id"])) for i in sel],
            )
            return await self._serve_read(request, query, read)
        return await self._guarded(work)

    async def _health_checks(self, request: web.Request) -> web.Response:
        async def work() -> web.Response:
            query, _ = self._query(request, _READ)
            notes = self.tracker.notes
            read = self._service_read("checks", request.match_info["name"], query,
                                      lambda sel: catalog.health_state(self.site, sel, "any", notes))
            return await self._serve_read(request, query, read)
        return await self._guarded(work)

    async def _health_state(self, request: web.Request) -> web.Response:
        async def work() -> web.Response:
            query, _ = self._query(request, _READ)
            wanted = request.match_info["state"]
            if wanted not in catalog.HEALTH_STATES:
                raise BadRequest(f"unknown check state {wanted[:40]!r}: one of {', '.join(catalog.HEALTH_STATES)}")

            def compute(state: RegistryState, principal: str) -> Answer:
                services = self._all_instances(state, principal)
                instances = [i for _, insts in services for i in insts]
                checks = catalog.health_state(self.site, instances, wanted, self.tracker.notes)
                candidate = candidate_index((i["mod_revision"] for i in instances), self.tracker.any_service_mark,
                                            state.revision, self.tracker.revision)
                return checks, candidate, True

            return await self._serve_read(request, query, self._services_read(f"health/state/{wanted}", compute))
        return await self._guarded(work)

    # -- endpoints: agent writes ------------------------------------------------------------------

    async def _body(self, request: web.Request) -> Any:
        return writes.decode_json(await request.read())

    async def _register(self, request: web.Request) -> web.Response:
        async def work() -> web.Response:
            query, _ = self._query(request, _WRITE)
            principal = self._principal(self._secret(request, query))
            reg = writes.parse_registration(await self._body(request), request.remote or "127.0.0.1")
            lease: int | None = None
            if reg.ttl_ms is not None:
                granted = await self._op(request, principal, "lease_grant", {"ttl_ms": reg.ttl_ms})
                lease = int(granted["lease"])
            try:
                await self._op(request, principal, "register", reg.register_args(lease))
            except RegistryError:
                if lease is not None:
                    await self._quietly(request, principal, "lease_revoke", {"lease": lease})
                raise
            return web.Response(status=200, headers=self._headers(self._holder.state.revision or 1))
        return await self._guarded(work)

    async def _quietly(self, request: web.Request, principal: str, op: str, args: dict[str, Any]) -> None:
        """Best-effort cleanup: a failure leaves a lease that expires on its own."""
        try:
            await self._op(request, principal, op, args)
        except RegistryError as err:
            log.info("consul: cleanup %s %s failed: %s", op, args, err.message)

    def _find(self, instance_id: str) -> dict[str, Any]:
        """The one instance with this id (Consul's agent-local ids are unique; ours are per service)."""
        model.check_name("id", instance_id)
        with self._holder.lock:
            state = self._holder.state
            names = state.services_with_instance(instance_id)
            if not names:
                raise NotFound(f"no instance with id {instance_id!r}")
            if len(names) > 1:
                raise Conflict(f"instance id {instance_id!r} is in services {', '.join(names[:5])}: "
                               "ids must be unique to use Consul's agent endpoints")
            instance: dict[str, Any] = state.get_instance(names[0], instance_id)
            return instance

    async def _deregister(self, request: web.Request) -> web.Response:
        async def work() -> web.Response:
            query, _ = self._query(request, _WRITE)
            principal = self._principal(self._secret(request, query))
            inst = self._find(request.match_info["id"])
            await self._op(request, principal, "deregister", {"service": inst["service"], "id": inst["id"]})
            lease = inst["lease"]
            if lease is not None:
                with self._holder.lock:
                    try:
                        info = self._holder.state.get_lease(lease)
                    except NotFound:
                        info = None
                if info is not None and not info["instances"] and not info["keys"] and not info["locks"]:
                    # The lease was the instance's TTL check: nothing else rides on it.
                    await self._quietly(request, principal, "lease_revoke", {"lease": lease})
            return web.Response(status=200, headers=self._headers(self._holder.state.revision or 1))
        return await self._guarded(work)

    def _check_setter(self, status: str) -> Callable[[web.Request], Any]:
        async def handler(request: web.Request) -> web.Response:
            async def work() -> web.Response:
                query, own = self._query(request, _CHECK_WRITE)
                note = own.get("note", [""])[-1]
                return await self._set_check(request, query, status, note)
            return await self._guarded(work)
        return handler

    async def _check_update(self, request: web.Request) -> web.Response:
        async def work() -> web.Response:
            query, _ = self._query(request, params.COMMON_PARAMS)
            update = writes.parse_check_update(await self._body(request))
            return await self._set_check(request, query, update.status, update.note)
        return await self._guarded(work)

    async def _set_check(self, request: web.Request, query: Query, status: str, note: str) -> web.Response:
        secret = self._secret(request, query)
        principal = self._principal(secret)
        check = request.match_info["check"]
        instance_id = catalog.instance_id_of_check(check)
        if instance_id is None:
            raise NotFound(f"unknown check {check[:80]!r}: every instance has one check, service:<instance id>")
        inst = self._find(instance_id)
        if inst["lease"] is not None:
            await self._keepalive(request, principal, secret, inst["lease"])
        args = {"service": inst["service"], "id": inst["id"], "status": status, "note": note}
        await self._op(request, principal, "set_status", args)
        return web.Response(status=200, headers=self._headers(self._holder.state.revision or 1))

    async def _keepalive(self, request: web.Request, principal: str, secret: str, lease: int) -> None:
        """Renew the lease: here if this node leads, else at the leader (keepalives are leader-local)."""
        try:
            await self._op(request, principal, "lease_keepalive", {"lease": lease})
            return
        except NotLeader as err:
            target = err.hint or self._leader_api()
            if target is None:
                raise
        client = Client([target], token=secret or None, timeout_s=FORWARD_TIMEOUT_S, client_name="consul-http")
        try:
            await client.call("lease_keepalive", {"lease": lease})
        finally:
            await client.close()

    # -- endpoints: KV ----------------------------------------------------------------------------

    async def _kv_get(self, request: web.Request) -> web.Response:
        async def work() -> web.Response:
            query, own = self._query(request, _KV_READ)
            key = request.match_info["key"]
            recurse = params.parse_flag("recurse", own.get("recurse", ()))
            keys_only = params.parse_flag("keys", own.get("keys", ()))
            raw = params.parse_flag("raw", own.get("raw", ()))
            separator = own.get("separator", [None])[-1]
            tracker = self.tracker
            if recurse or keys_only:
                model.check_key_prefix("prefix", key)
                if raw:
                    raise BadRequest("?raw reads one key; it cannot go with ?recurse or ?keys")

                def listing(state: RegistryState, principal: str) -> Answer:
                    records = [r for r in state.list_keys(key) if self._visible(state, principal, "key:" + r["key"])]
                    candidate = candidate_index((r["mod_revision"] for r in records), tracker.key_mark,
                                                state.revision, tracker.revision)
                    body: Any = (kv.kv_keys([r["key"] for r in records], key, separator) if keys_only
                                 else [kv.kv_entry(r) for r in records])
                    return body, candidate, bool(records)

                mode = f"keys={separator or ''}" if keys_only else "recurse"
                read = _Read(f"kv/{key}?{mode}", "key_list", {"prefix": key}, Selector("prefix", key), listing)
            else:
                model.check_key("key", key)

                def single(state: RegistryState, principal: str) -> Answer:
                    try:
                        record = state.get_key(key)
                    except NotFound:
                        return None, candidate_index((), tracker.key_mark, state.revision, tracker.revision), False
                    candidate = candidate_index((record["mod_revision"],), 0, state.revision, tracker.revision)
                    return (record["value"] if raw else [kv.kv_entry(record)]), candidate, True

                read = _Read(f"kv/{key}" + ("?raw" if raw else ""), "key_get", {"key": key}, Selector("prefix", key),
                             single, raw=raw)
            return await self._serve_read(request, query, read)
        return await self._guarded(work)

    @staticmethod
    def _cas(own: dict[str, list[str]]) -> int | None:
        raw = own.get("cas", [None])[-1]
        if raw is None:
            return None
        if not raw.isascii() or not raw.isdigit() or len(raw) > 19:
            raise BadRequest(f"?cas={raw[:40]!r}: must be a non-negative integer (0: only if the key is absent)")
        return int(raw)

    async def _kv_put(self, request: web.Request) -> web.Response:
        async def work() -> web.Response:
            query, own = self._query(request, _KV_WRITE)
            principal = self._principal(self._secret(request, query))
            key = request.match_info["key"]
            flags = own.get("flags", ["0"])[-1]
            if flags != "0":
                raise BadRequest("?flags: values carry no flags here; only 0 is accepted")
            cas = self._cas(own)
            value = kv.kv_value(await request.read())
            args: dict[str, Any] = {"key": key, "value": value}
            if cas is not None:
                args["if_mod_revision"] = cas
            try:
                await self._op(request, principal, "key_put", args)
            except Conflict:
                return self._json(False, self._holder.state.revision or 1, request)
            return self._json(True, self._holder.state.revision or 1, request)
        return await self._guarded(work)

    async def _kv_delete(self, request: web.Request) -> web.Response:
        async def work() -> web.Response:
            query, own = self._query(request, _KV_DELETE)
            if params.parse_flag("recurse", own.get("recurse", ())):
                raise BadRequest("?recurse deletes are not supported: they would not be atomic here; "
                                 "delete the keys one by one")
            principal = self._principal(self._secret(request, query))
            args: dict[str, Any] = {"key": request.match_info["key"]}
            cas = self._cas(own)
            if cas is not None:
                args["if_mod_revision"] = cas
            try:
                await self._op(request, principal, "key_delete", args)
            except Conflict:
                return self._json(False, self._holder.state.revision or 1, request)
            except NotFound:
                if cas not in (None, 0):
                    return self._json(False, self._holder.state.revision or 1, request)
            return self._json(True, self._holder.state.revision or 1, request)
        return await self._guarded(work)
