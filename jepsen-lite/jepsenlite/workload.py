"""Workloads: client processes that drive traffic and record what happened.

Each workload runs ``concurrency`` logical processes.  A process does one
operation at a time through its own ``registry.client.Client`` and records
``invoke`` before the request and ``ok`` / ``fail`` / ``info`` after it:

* ``ok``   -- the cluster answered with a result;
* ``fail`` -- the cluster answered with an error code that guarantees nothing
  was applied (``CONFLICT``, ``NOT_FOUND``, ``BAD_REQUEST`` and its kin,
  ``PERMISSION_DENIED``, ``UNAUTHENTICATED``);
* ``info`` -- anything else: ``TIMEOUT``, ``UNAVAILABLE``, ``NOT_LEADER`` (the
  client retries with the same request id, so an earlier attempt may have
  applied), a lost connection, a protocol error, ``INTERNAL``.  The process
  then continues under a fresh id (see ``history``).

Every request has a bounded timeout (``op_timeout_s``, 2 s by default).
Randomness comes from ``random.Random`` seeded by (seed, workload, slot), so
the operations each process *chooses* replay from the seed; what the
cluster answers, and so the exact history, depends on timing.

Workloads
---------
``register``  per-key register on a few keys: ``key_put`` (write), ``key_put``
              with ``if_mod_revision`` (compare-and-set against the
              (value, mod_revision) this process last saw), linearizable
              ``key_get``.  Every written value is unique.
``set``       register / deregister unique instances of one service, and
              linearizable ``service_get`` reads, plus a final read.
``lease``     grant a lease; in rounds, keep it alive every 20-300 ms for a while,
              then stop and (often) probe it with a linearizable ``lease_get``
              from a random node shortly before its deadline (a probe does not
              renew); finally revoke it, or let it lapse and ask again.
``lock``      grant a lease, acquire a lock with it (fencing token), hold it
              briefly while keeping the lease alive, release, revoke.
``watch``     put / delete keys under one prefix while watch streams on the
              nodes record every change they deliver; a final linearizable
              list and one stream per node up to its revision.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

from registry.client import Client
from registry.errors import (
    BadRequest,
    Conflict,
    NotFound,
    PermissionDenied,
    RegistryError,
    Unauthenticated,
)

from .history import Recorder

__all__ = ["Context", "Worker", "Outcome", "Workload", "WORKLOADS", "DEFINITE_FAILURES"]

#: Errors that guarantee the request was not applied.  Everything else is "unknown".
DEFINITE_FAILURES: tuple[type[RegistryError], ...] = (BadRequest, Conflict, NotFound, PermissionDenied,
                                                      Unauthenticated)
#: Longest a final read keeps retrying after the faults are healed.
FINAL_READ_DEADLINE_S = 30.0
FINAL_READ_TIMEOUT_S = 5.0


@dataclass
class Context:
    endpoints: list[str]
    recorder: Recorder
    seed: int
    stop: asyncio.Event
    op_timeout_s: float = 2.0
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(0))

    def new_process(self) -> int:
        return next(self._ids)

    async def sleep(self, seconds: float) -> bool:
        """Sleep unless the run is stopping; return False if it is (then start no new operation)."""
        if seconds > 0:
            try:
                await asyncio.wait_for(self.stop.wait(), seconds)
            except TimeoutError:
                pass
        return not self.stop.is_set()


@dataclass(frozen=True, slots=True)
class Outcome:
    type: str
    body: Any = None
    revision: int | None = None
    error: RegistryError | None = None

    @property
    def ok(self) -> bool:
        return self.type == "ok"

    @property
    def code(self) -> str | None:
        return None if self.error is None else self.error.code


class Worker:
    """One logical client process (renumbered after an info outcome)."""

    def __init__(self, ctx: Context, workload: str, slot: int) -> None:
        self.ctx = ctx
        self.workload = workload
        self.slot = slot
        self.process = ctx.new_process()
        self.rng = random.Random(f"{ctx.seed}/{workload}/{slot}")
        # Spread processes over the nodes deterministically (Client's own shuffle is unseeded).
        shift = slot % len(ctx.endpoints)
        endpoints = ctx.endpoints[shift:] + ctx.endpoints[:shift]
        self.client = Client(endpoints, timeout_s=ctx.op_timeout_s, connect_timeout_s=min(0.5, ctx.op_timeout_s),
                             client_name=f"jepsen-{workload}-{slot}")
        self.seq = 0

    def unique(self, prefix: str) -> str:
        self.seq += 1
        return f"{prefix}{self.process}-{self.seq}"

    async def op(self, f: str, key: Any, value: Any, request: str, args: dict[str, Any], *,
                 timeout_s: float | None = None, client: Client | None = None,
                 result: Callable[[Any], Any] = lambda body: body,
                 result_key: Callable[[Any], Any] | None = None,
                 extra: Callable[[Any], dict[str, Any]] | None = None,
                 not_found_ok: bool = False) -> Outcome:
        """Record invoke, send ``request`` with ``args``, record the completion; return what happened."""
        recorder = self.ctx.recorder
        timeout_s = timeout_s or self.ctx.op_timeout_s
        via = client or self.client
        invoked = recorder.invoke(self.process, self.workload, f, key, value)
        try:
            # The client enforces the timeout itself; this is a backstop for anything it misses.
            revision, body = await asyncio.wait_for(via.call(request, args, timeout_s=timeout_s), timeout_s + 1.0)
        except NotFound as err:
            if not_found_ok:
                recorder.complete(invoked, "ok", None, extra=self._where(via))
                return Outcome("ok", None, None, err)
            recorder.complete(invoked, "fail", error=err.code, extra=self._where(via))
            return Outcome("fail", error=err)
        except DEFINITE_FAILURES as err:
            recorder.complete(invoked, "fail", error=err.code, extra=self._where(via))
            return Outcome("fail", error=err)
        except RegistryError as err:
            recorder.complete(invoked, "info", error=err.code)
            self.process = self.ctx.new_process()
            return Outcome("info", error=err)
        except (OSError, TimeoutError) as err:
            recorder.complete(invoked, "info", error=type(err).__name__)
            self.process = self.ctx.new_process()
            return Outcome("info")
        recorder.complete(invoked, "ok", result(body), key=result_key(body) if result_key else None,
                          revision=revision, extra={**self._where(via), **(extra(body) if extra else {})})
        return Outcome("ok", body, revision)

    @staticmethod
    def _where(client: Client) -> dict[str, Any]:
        """The endpoint that answered (the client's current connection), for diagnosis."""
        return {"endpoint": client.endpoint} if client.endpoint else {}

    async def close(self) -> None:
        await self.client.close()


class Workload:
    name: ClassVar[str] = ""

    async def run(self, worker: Worker) -> None:
        raise NotImplementedError

    async def final(self, ctx: Context) -> None:
        """Reads after every fault is healed (default: none)."""


async def _final_read(ctx: Context, workload: str, f: str, key: Any, request: str, args: dict[str, Any],
                      result: Callable[[Any], Any], not_found_ok: bool = True) -> bool:
    """Retry a final read (each attempt recorded) until one is ok or the deadline passes."""
    worker = Worker(ctx, workload, 0)
    end = time.monotonic() + FINAL_READ_DEADLINE_S
    try:
        while time.monotonic() < end:
            out = await worker.op(f, key, None, request, args, timeout_s=FINAL_READ_TIMEOUT_S, result=result,
                                  not_found_ok=not_found_ok)
            if out.ok:
                return True
            await asyncio.sleep(0.5)
        return False
    finally:
        await worker.close()


# ---------------------------------------------------------------------------------------------- register


class RegisterWorkload(Workload):
    name = "register"

    def __init__(self, keys: int = 5) -> None:
        self.keys = [f"jepsen-r{i}" for i in range(keys)]

    async def run(self, w: Worker) -> None:
        # (value, mod_revision) this process last saw per key: the basis of its CAS guards.
        seen: dict[str, tuple[str | None, int]] = {}
        while await w.ctx.sleep(w.rng.uniform(0.0, 0.02)):
            key = w.rng.choice(self.keys)
            dice = w.rng.random()
            if dice < 0.45:
                out = await w.op("read", key, None, "key_get", {"key": key, "consistency": "linearizable"},
                                 result=lambda body: body["value"],
                                 extra=lambda body: {"mod_revision": body["mod_revision"]}, not_found_ok=True)
                if out.ok:
                    seen[key] = (None, 0) if out.body is None else (out.body["value"], int(out.body["mod_revision"]))
            elif dice < 0.75:
                value = w.unique("w")
                out = await w.op("write", key, value, "key_put", {"key": key, "value": value},
                                 result=lambda body: None)
                if out.ok and out.revision is not None:
                    seen[key] = (value, out.revision)
            else:
                expected, expected_rev = seen.get(key, (None, 0))
                value = w.unique("c")
                out = await w.op("cas", key, {"from": expected, "from_revision": expected_rev, "to": value},
                                 "key_put", {"key": key, "value": value, "if_mod_revision": expected_rev},
                                 result=lambda body: None)
                if out.ok and out.revision is not None:
                    seen[key] = (value, out.revision)
                elif out.code == "CONFLICT":
                    seen.pop(key, None)

    async def final(self, ctx: Context) -> None:
        for key in self.keys:
            await _final_read(ctx, self.name, "read", key, "key_get", {"key": key, "consistency": "linearizable"},
                              result=lambda body: body["value"])


# ---------------------------------------------------------------------------------------------- set


class SetWorkload(Workload):
    name = "set"
    SERVICE = "jepsen-set"

    @staticmethod
    def _members(body: Any) -> list[str]:
        return sorted(inst["id"] for inst in body["instances"])

    async def run(self, w: Worker) -> None:
        added: list[str] = []
        read_args = {"name": self.SERVICE, "consistency": "linearizable"}
        while await w.ctx.sleep(w.rng.uniform(0.0, 0.02)):
            dice = w.rng.random()
            if dice < 0.6 or (dice < 0.8 and not added):
                element = w.unique("e")
                args = {"service": self.SERVICE, "id": element, "address": "127.0.0.1", "port": 1 + w.seq % 60_000}
                out = await w.op("add", self.SERVICE, element, "register", args, result=lambda body: None)
                if out.ok:
                    added.append(element)
            elif dice < 0.8:
                element = added.pop(w.rng.randrange(len(added)))
                await w.op("remove", self.SERVICE, element, "deregister", {"service": self.SERVICE, "id": element},
                           result=lambda body: None)
            else:
                await w.op("read", self.SERVICE, None, "service_get", read_args, result=self._members,
                           not_found_ok=True)

    async def final(self, ctx: Context) -> None:
        await _final_read(ctx, self.name, "read", self.SERVICE, "service_get",
                          {"name": self.SERVICE, "consistency": "linearizable"}, result=self._members)


# ---------------------------------------------------------------------------------------------- lease


class LeaseWorkload(Workload):
    name = "lease"

    def __init__(self, ttl_ms: int = 1000) -> None:
        self.ttl_ms = ttl_ms

    async def run(self, w: Worker) -> None:
        ttl_s = self.ttl_ms / 1000
        while await w.ctx.sleep(w.rng.uniform(0.0, 0.1)):
            out = await w.op("grant", None, self.ttl_ms, "lease_grant", {"ttl_ms": self.ttl_ms},
                             result=lambda body: {"lease": body["lease"], "ttl_ms": body["ttl_ms"]},
                             result_key=lambda body: body["lease"])
            if not out.ok:
                continue
            lease = int(out.body["lease"])
            if not await self._keep(w, lease, ttl_s):
                continue
            if w.rng.random() < 0.3:
                # Let it lapse, then ask: NOT_FOUND is expected (still alive is only a liveness note).
                if not await w.ctx.sleep(ttl_s + 1.0):
                    return
                await w.op("keepalive", lease, None, "lease_keepalive", {"lease": lease},
                           result=lambda body: body["ttl_ms"])
            else:
                await w.op("revoke", lease, None, "lease_revoke", {"lease": lease}, result=lambda body: None)

    async def _keep(self, w: Worker, lease: int, ttl_s: float) -> bool:
        """Rounds of frequent keepalives, each followed by a quiet spell; False once the lease is gone."""
        for _ in range(w.rng.randint(2, 5)):
            renewed: float | None = None
            busy_until = time.monotonic() + w.rng.uniform(0.2, 2.0)
            while time.monotonic() < busy_until:
                started = time.monotonic()
                out = await w.op("keepalive", lease, None, "lease_keepalive", {"lease": lease},
                                 result=lambda body: body["ttl_ms"])
                if out.type == "fail":
                    return False
                if out.ok:
                    renewed = started
                if not await w.ctx.sleep(w.rng.uniform(0.02, 0.3)):
                    return False
            if renewed is None:
                continue
            if w.rng.random() < 0.6:
                # Stop renewing and probe shortly before the deadline counted from the last
                # acknowledged renewal: a linearizable read must still find the lease.  From a node
                # picked at random, not over the keepalive connection (which may be stuck on a
                # partitioned node and would only time out).
                if not await w.ctx.sleep(w.rng.uniform(0.8, 0.97) * ttl_s - (time.monotonic() - renewed)):
                    return False
                probe_client = Client([w.rng.choice(w.ctx.endpoints)], timeout_s=w.ctx.op_timeout_s,
                                      connect_timeout_s=min(0.5, w.ctx.op_timeout_s), client_name="jepsen-probe")
                try:
                    await w.op("probe", lease, None, "lease_get", {"lease": lease, "consistency": "linearizable"},
                               client=probe_client, result=lambda body: {"ttl_ms": body["ttl_ms"]},
                               not_found_ok=True)
                finally:
                    await probe_client.close()
            elif not await w.ctx.sleep(w.rng.uniform(0.1, 0.7) * ttl_s):
                return False
        return True


# ---------------------------------------------------------------------------------------------- lock


class LockWorkload(Workload):
    name = "lock"
    LOCK = "jepsen-lock"

    def __init__(self, ttl_ms: int = 3000) -> None:
        self.ttl_ms = ttl_ms

    async def run(self, w: Worker) -> None:
        name = self.LOCK
        while await w.ctx.sleep(w.rng.uniform(0.0, 0.1)):
            out = await w.op("grant", name, {"ttl_ms": self.ttl_ms}, "lease_grant", {"ttl_ms": self.ttl_ms},
                             result=lambda body: {"lease": body["lease"]})
            if not out.ok:
                continue
            lease = int(out.body["lease"])
            holder = f"p{w.process}"
            out = await w.op("acquire", name, {"lease": lease, "holder": holder}, "lock_acquire",
                             {"name": name, "lease": lease, "holder": holder},
                             result=lambda body: {"token": body["token"], "acquired": body["acquired"]})
            if out.type == "info":
                continue  # maybe held: the lease expires on its own
            if out.ok:
                for _ in range(w.rng.randint(1, 3)):
                    if not await w.ctx.sleep(w.rng.uniform(0.05, 0.3)):
                        break
                    await w.op("keepalive", name, {"lease": lease}, "lease_keepalive", {"lease": lease},
                               result=lambda body: body["ttl_ms"])
                await w.op("release", name, {"lease": lease}, "lock_release", {"name": name, "lease": lease},
                           result=lambda body: {"revision": body["revision"]})
            await w.op("revoke", name, {"lease": lease}, "lease_revoke", {"lease": lease}, result=lambda body: None)


# ---------------------------------------------------------------------------------------------- watch


class WatchWorkload(Workload):
    """Writers change keys under one prefix; watch streams on the nodes record what they deliver.

    Every slot writes (``put`` of a unique value, or ``delete``, of a few keys).  The first
    ``STREAMS`` slots also run a watcher: a sequence of watch streams ("segments"), each a few
    seconds long on a different node (the client resumes on another node if its node fails), each
    starting where the previous one stopped -- the first from revision 1, when the selection was
    empty.  A segment is one ``watch`` op: invoked when opened, completed ``ok`` with every item it
    delivered.  After healing, a linearizable ``final-read`` lists the prefix at revision F, then
    one more segment per node, pinned to it, from where the watchers stopped until it covered F.
    """

    name = "watch"
    PREFIX = "jepsen-w/"
    STREAMS = 3
    PROGRESS_MS = 200
    SEGMENT_S = (2.0, 8.0)
    FINAL_STREAM_DEADLINE_S = 30.0

    def __init__(self, keys: int = 4) -> None:
        self.keys = [f"{self.PREFIX}k{i}" for i in range(keys)]
        #: Per watcher slot: the next revision its last segment would have delivered.
        self.next_revision: dict[int, int] = {}

    async def run(self, w: Worker) -> None:
        if w.slot < self.STREAMS:
            await asyncio.gather(self._write(w), self._watcher(w))
        else:
            await self._write(w)

    async def _write(self, w: Worker) -> None:
        while await w.ctx.sleep(w.rng.uniform(0.0, 0.05)):
            key = w.rng.choice(self.keys)
            if w.rng.random() < 0.8:
                value = w.unique("v")
                await w.op("put", key, value, "key_put", {"key": key, "value": value}, result=lambda body: None)
            else:
                await w.op("delete", key, None, "key_delete", {"key": key}, result=lambda body: None)

    async def _watcher(self, w: Worker) -> None:
        n = len(w.ctx.endpoints)
        start = 1
        segment = 0
        while not w.ctx.stop.is_set():
            shift = (w.slot + segment) % n
            endpoints = w.ctx.endpoints[shift:] + w.ctx.endpoints[:shift]
            start = await self.segment(w.ctx, endpoints, start, duration_s=w.rng.uniform(*self.SEGMENT_S))
            self.next_revision[w.slot] = start
            segment += 1

    async def segment(self, ctx: Context, endpoints: list[str], start: int, *, duration_s: float,
                      until_revision: int | None = None) -> int:
        """One watch stream from ``start``, recorded as one op; return the next revision it would deliver.

        Ends after ``duration_s``, when the run stops (unless ``until_revision`` is given: then it ends
        once it covered that revision).
        """
        process = ctx.new_process()
        invoked = ctx.recorder.invoke(process, self.name, "watch", self.PREFIX,
                                      {"start_revision": start, "node": endpoints[0]})
        items: list[list[Any]] = []
        state: dict[str, Any] = {"created": None, "covered": start - 1, "error": None}
        client = Client(endpoints, timeout_s=ctx.op_timeout_s, connect_timeout_s=min(0.5, ctx.op_timeout_s),
                        client_name=f"jepsen-watch-{process}")

        async def consume() -> None:
            stream = client.watch(prefix=self.PREFIX, start_revision=start, progress_ms=self.PROGRESS_MS)
            async with contextlib.aclosing(cast(AsyncGenerator[dict[str, Any], None], stream)) as items_in:
                await self._consume(items_in, items, state, until_revision)

        task = asyncio.create_task(consume())
        waits: list[asyncio.Future[Any]] = [task]
        stopper: asyncio.Task[Any] | None = None
        if until_revision is None:
            stopper = asyncio.create_task(ctx.stop.wait())
            waits.append(stopper)
        try:
            await asyncio.wait(waits, timeout=duration_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (task, stopper):
                if t is not None and not t.done():
                    t.cancel()
            results = await asyncio.gather(task, *([stopper] if stopper else []), return_exceptions=True)
            if isinstance(results[0], BaseException) and not isinstance(results[0], asyncio.CancelledError):
                state["error"] = repr(results[0])
            await client.close()
            ctx.recorder.complete(invoked, "ok", {"created": state["created"], "items": items,
                                                  "covered": state["covered"], "error": state["error"]},
                                  extra={"endpoint": client.endpoint} if client.endpoint else None)
        return int(state["covered"]) + 1

    @staticmethod
    async def _consume(items_in: AsyncGenerator[dict[str, Any], None], items: list[list[Any]], state: dict[str, Any],
                       until_revision: int | None) -> None:
        async for item in items_in:
            now = time.monotonic_ns()
            kind = item.get("type")
            if kind == "created":
                state["created"] = int(item["revision"])
            elif kind == "events":
                for event in item["events"]:
                    revision = int(event["revision"])
                    type_ = event["type"] if event.get("kind") == "key" else f"{event.get('kind')}-{event['type']}"
                    after = event.get("after") or {}
                    items.append(["event", revision, type_, event.get("id"),
                                  after.get("value") if event["type"] == "put" else None, now])
                    state["covered"] = max(state["covered"], revision)
            elif kind == "progress":
                revision = int(item["revision"])
                if items and items[-1][0] == "progress":
                    items[-1] = ["progress", revision, now]
                else:
                    items.append(["progress", revision, now])
                state["covered"] = max(state["covered"], revision)
            elif kind == "snapshot":
                revision = int(item["revision"])
                keys = {k["key"]: [k["value"], k["mod_revision"]] for k in item.get("keys", [])}
                items.append(["snapshot", revision, keys, now])
                state["covered"] = max(state["covered"], revision)
            if until_revision is not None and state["covered"] >= until_revision:
                return

    async def final(self, ctx: Context) -> None:
        worker = Worker(ctx, self.name, 0)
        final_revision: int | None = None
        end = time.monotonic() + FINAL_READ_DEADLINE_S
        try:
            while time.monotonic() < end:
                out = await worker.op("final-read", self.PREFIX, None, "key_list",
                                      {"prefix": self.PREFIX, "consistency": "linearizable"},
                                      timeout_s=FINAL_READ_TIMEOUT_S,
                                      result=lambda body: {k["key"]: [k["value"], k["mod_revision"]] for k in body})
                if out.ok:
                    final_revision = out.revision
                    break
                await asyncio.sleep(0.5)
        finally:
            await worker.close()
        if final_revision is None:
            return
        start = min(self.next_revision.values(), default=1)
        await asyncio.gather(*(self.segment(ctx, [endpoint], start, duration_s=self.FINAL_STREAM_DEADLINE_S,
                                            until_revision=final_revision) for endpoint in ctx.endpoints))


WORKLOADS: dict[str, Callable[[], Workload]] = {
    "register": RegisterWorkload,
    "set": SetWorkload,
    "lease": LeaseWorkload,
    "lock": LockWorkload,
    "watch": WatchWorkload,
}
