"""The request handlers of a node: one table from op name to handler.

This module knows what each op means (write through the proposer, read
through a barrier or locally); it knows nothing about sockets or frames,
so the asyncio server in ``server.py`` stays a thin shell around it.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from registry.build import build_kind
from registry.errors import BadRequest, InvalidArgument, Timeout, UnknownOp
from registry.fsm import model
from registry.fsm.commands import validate_command
from registry.fsm.ops import WRITE_OPS
from registry.fsm.state import RegistryState
from registry.raft.node import RaftNode, StateHolder
from registry.server.backup import encode_backup
from registry.server.proposer import Proposer, outcome_result

__all__ = [
    "RegistryAPI", "NodeInfo", "RevisionWaiters", "WRITE_OPS", "CURRENT_AUTH", "CURRENT_PEER", "Deferred", "Started",
    "Starter",
]

#: sha256 of the token of the request being served, set by the server only with ACLs on;
#: writers stamp it into the command as ``auth`` so the state machine authorizes at apply time.
CURRENT_AUTH: ContextVar[str | None] = ContextVar("regctl_current_auth", default=None)
#: The client address of the request being served (login rate limits, audit).
CURRENT_PEER: ContextVar[str | None] = ContextVar("regctl_current_peer", default=None)

#: Backup bytes per stream item: well under the 1 MiB frame limit.
BACKUP_CHUNK_BYTES = 256 << 10

#: Largest min_revision wait, in seconds: past it the client gets TIMEOUT.
MIN_REVISION_WAIT_S_MAX = 10.0

_READ_COMMON = {"consistency", "min_revision"}


@dataclass(frozen=True, slots=True)
class NodeInfo:
    node_id: str
    api_addr: str
    raft_addr: str
    http_addr: str
    #: raft address -> API address of every configured node, for leader hints.
    api_by_raft: dict[str, str]


Handler = Callable[[dict[str, Any]], Awaitable[tuple[int, Any]]]


class Deferred:
    """A request started without a task, waiting for ``future``.

    Once the future is done, ``finish(future)`` gives the answer (or another
    ``Deferred``) or raises the request's error; it must call
    ``future.result()`` so the future's error or cancellation propagates.
    """

    __slots__ = ("finish", "future")

    def __init__(self, future: asyncio.Future[Any], finish: Callable[[asyncio.Future[Any]], Started]) -> None:
        self.future = future
        self.finish = finish


#: What a starter returns: the answer ``(revision, body)`` now, or a ``Deferred``.
Started = tuple[int, Any] | Deferred
#: The task-free form of a handler (see ``RegistryAPI.starter``); raises RegistryError like a handler.
Starter = Callable[[dict[str, Any]], Started]


def _write_answer(future: asyncio.Future[Any]) -> tuple[int, Any]:
    result = outcome_result(future.result())
    return int(result["revision"]), result


def _future_answer(future: asyncio.Future[Any]) -> Started:
    answer: Started = future.result()
    return answer


def _handler(start: Starter) -> Handler:
    """The async handler of a starter: the same steps, awaited in the caller's task.

    Requests that need a task (ACL checks that await, per-request context)
    run an op's one implementation through this; the rest run it task-free
    (``APIServer``'s ``_advance``).
    """

    async def handle(args: dict[str, Any]) -> tuple[int, Any]:
        started = start(args)
        while isinstance(started, Deferred):
            await started.future
            started = started.finish(started.future)
        return started

    return handle


#: A read: (state, args) -> body, run under the state lock.
ReadFn = Callable[[RegistryState, dict[str, Any]], Any]


class RevisionWaiters:
    """Futures waiting for the local state to reach a revision.

    The node calls ``applied(revision)`` on the loop after each applied batch;
    it costs one comparison unless someone waits.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiting: list[tuple[int, asyncio.Future[None]]] = []
        self._lowest: int | None = None

    def applied(self, revision: int) -> None:
        lowest = self._lowest
        if lowest is not None and revision >= lowest:
            self._wake(revision)

    def _wake(self, revision: int) -> None:
        still = []
        for wanted, future in self._waiting:
            if wanted <= revision:
                if not future.done():
                    future.set_result(None)
            elif not future.done():
                still.append((wanted, future))
        self._waiting = still
        self._lowest = min((w for w, _ in still), default=None)

    async def wait(self, revision: int, current: Callable[[], int], timeout_s: float) -> None:
        if current() >= revision:
            return
        future: asyncio.Future[None] = self._loop.create_future()
        self._waiting.append((revision, future))
        self._lowest = revision if self._lowest is None else min(self._lowest, revision)
        # The revision may have arrived between the check and the registration.
        if current() >= revision:
            self._wake(current())
        try:
            await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            raise Timeout(
                f"this node has not applied revision {revision} within {timeout_s:g}s "
                f"(it is at {current()}); try another node"
            ) from None


class RegistryAPI:
    def __init__(
        self,
        info: NodeInfo,
        holder: StateHolder,
        raft: RaftNode,
        proposer: Proposer,
        waiters: RevisionWaiters,
        request_timeout_s: float,
    ) -> None:
        self.info = info
        self._holder = holder
        self._raft = raft
        self._proposer = proposer
        self._waiters = waiters
        self._timeout_s = request_timeout_s
        #: Extra live numbers for status (requests, leases, watchers), set by the node.
        self.extra_status: Callable[[], dict[str, Any]] = dict
        #: Testing only (the unsafe-local-reads failpoint, registry.failpoints): no read barrier.
        self.unsafe_local_reads = False
        #: op -> (read function, allowed argument names) of the built-in reads.
        self._read_fns: dict[str, tuple[ReadFn, set[str]]] = {
            "service_get": (lambda s, a: s.get_service(_name(a, "name")), {"name"}),
            "service_list": (lambda s, a: s.list_services(), set()),
            "instance_get": (lambda s, a: s.get_instance(_name(a, "service"), _name(a, "id")), {"service", "id"}),
            "lease_get": (lambda s, a: s.get_lease(_int(a, "lease")), {"lease"}),
            "lease_list": (lambda s, a: s.list_leases(), set()),
            "key_get": (lambda s, a: s.get_key(model.check_key("key", _str(a, "key"))), {"key"}),
            "key_list": (lambda s, a: s.list_keys(_str(a, "prefix", "")), {"prefix"}),
            "lock_get": (lambda s, a: s.get_lock(model.check_key("name", _str(a, "name"))), {"name"}),
            # Every service with its instances, in one consistent read.
            "service_dump": (lambda s, a: [s.get_service(item["name"]) for item in s.list_services()], set()),
        }
        #: Task-free forms of the built-in handlers (see ``starter``); their async handlers are the
        #: same starters driven by ``_handler``, so each op has one implementation.
        self._starters: dict[str, Starter] = {op: self._write_starter(op) for op in WRITE_OPS}
        for op, (fn, allowed) in self._read_fns.items():
            self._starters[op] = self._read_starter(fn, allowed)
        self._handlers: dict[str, Handler] = {"status": self._status}
        for op, start in self._starters.items():
            self._handlers[op] = _handler(start)
        #: Ops whose args the handler checks field by field by exact type (``validate_command``)
        #: before anything else reads them: the server skips the frame's data-model walk for
        #: those args (``registry.fsm.ops.WRITE_OPS``).  An op given another handler leaves the set.
        self.field_checked_ops: frozenset[str] = WRITE_OPS

    @property
    def ops(self) -> set[str]:
        return set(self._handlers)

    @property
    def revision(self) -> int:
        return self._holder.state.revision

    def add_handler(self, op: str, handler: Handler) -> None:
        self._handlers[op] = handler
        self._starters.pop(op, None)  # the new handler replaces the built-in op everywhere
        self.field_checked_ops = self.field_checked_ops - {op}

    def starter(self, op: str) -> Starter | None:
        """The task-free form of ``op``'s handler, if it has one (built-in reads and writes).

        Same checks, errors and answers as ``handle``; the server uses it when
        no per-request context is needed (ACLs off), to answer from a future's
        done-callback instead of running a task per request (~10 us each).
        """
        return self._starters.get(op)

    async def handle(self, op: str, args: dict[str, Any]) -> tuple[int, Any]:
        handler = self._handlers.get(op)
        if handler is None:
            raise UnknownOp(f"unknown op {op!r}")
        return await handler(args)

    # -- writes -------------------------------------------------------------

    def writer(self, op: str) -> Handler:
        return _handler(self._write_starter(op))

    def reader(self, fn: ReadFn, allowed: set[str]) -> Handler:
        return _handler(self._read_starter(fn, allowed))

    def _write_starter(self, op: str) -> Starter:
        def start(args: dict[str, Any]) -> Started:
            return Deferred(self._proposer.propose(_write_command(op, args), validated=True), _write_answer)

        return start

    # -- reads --------------------------------------------------------------

    def _read_starter(self, fn: ReadFn, allowed: set[str]) -> Starter:
        """A read: its barrier (linearizable), a wait for ``min_revision`` if this node lags, then ``fn``."""
        allowed_all = allowed | _READ_COMMON
        holder = self._holder

        def start(args: dict[str, Any]) -> Started:
            linearizable, min_revision = _read_args(args, allowed_all)
            if linearizable and not self.unsafe_local_reads:
                return Deferred(self._proposer.barrier_future(), lambda barrier: answer(barrier, args, min_revision))
            return local(args, min_revision)

        def answer(barrier: asyncio.Future[Any], args: dict[str, Any], min_revision: int) -> Started:
            barrier.result()
            return local(args, min_revision)

        def local(args: dict[str, Any], min_revision: int) -> Started:
            # Never below what this node already served (see StateHolder.high_water).
            wanted = max(min_revision, holder.high_water)
            if wanted > holder.state.revision:
                # Rare (a lagging node, read-your-writes): wait until applied that far.
                waited = asyncio.ensure_future(self._waiters.wait(
                    wanted, lambda: holder.state.revision, min(self._timeout_s, MIN_REVISION_WAIT_S_MAX)))
                return Deferred(waited, lambda done: read_now(done, args))
            return read_now(None, args)

        def read_now(waited: asyncio.Future[Any] | None, args: dict[str, Any]) -> Started:
            if waited is not None:
                waited.result()
            with holder.lock:
                state = holder.state
                return state.revision, fn(state, args)

        return start

    async def snapshot_save(self, args: dict[str, Any], sink: Any) -> None:
        """Stream a consistent backup: chunks, then the revision and checksum."""
        if args:
            raise BadRequest(f"unknown field(s) {', '.join(sorted(args))}")
        await self._proposer.barrier()
        with self._holder.lock:
            state = self._holder.state
            revision = state.revision
            state_bytes = state.snapshot()
        data = encode_backup(state_bytes, revision, int(time.time() * 1000))
        for offset in range(0, len(data), BACKUP_CHUNK_BYTES):
            sink.send({"type": "chunk", "data": data[offset : offset + BACKUP_CHUNK_BYTES]})
            await sink.drain()
        sink.send({"type": "done", "revision": revision, "bytes": len(data)})

    async def _status(self, args: dict[str, Any]) -> tuple[int, Any]:
        st = self._raft.raft_status()
        revision = self._holder.state.revision
        leader_api = self.info.api_by_raft.get(st.leader) if st.leader else None
        if st.leader == self.info.raft_addr:
            leader_api = self.info.api_addr
        return revision, {
            "id": self.info.node_id,
            "role": st.role,
            "term": st.term,
            "commit_index": st.commit_index,
            "applied_index": st.applied_index,
            "revision": revision,
            "leader": st.leader,
            "leader_api": leader_api,
            "has_quorum": st.has_quorum,
            "api": self.info.api_addr,
            "raft": self.info.raft_addr,
            "http": self.info.http_addr,
            "peers": st.peers_connected,
            "log_len": st.log_len,
            # So `regctl status` can name the process to look at (or kill -9, as the README does).
            "pid": os.getpid(),
            # "mypyc" or "pure" (registry/build.py): the same behaviour, not the same speed.
            "build": build_kind(),
            **self.extra_status(),
        }


def _write_command(op: str, args: dict[str, Any]) -> dict[str, Any]:
    """The validated command of a client write of ``op``."""
    if "op" in args or "now_ms" in args or "auth" in args:
        raise BadRequest("fields 'op', 'now_ms' and 'auth' are set by the node, not the client")
    command = dict(args)
    auth = CURRENT_AUTH.get()
    if auth:
        command["auth"] = auth
    command["op"] = op
    # Time enters the state machine only here, stamped by the node
    # that proposes; the state machine never reads a clock.
    command["now_ms"] = int(time.time() * 1000)
    return validate_command(command)


def _read_args(args: dict[str, Any], allowed: set[str]) -> tuple[bool, int]:
    """Check a read's arguments; return (linearizable?, min_revision)."""
    if not allowed.issuperset(args):
        unknown = set(args) - allowed
        raise BadRequest(f"unknown field(s) {', '.join(sorted(unknown))}")
    consistency = args.get("consistency", "linearizable")
    if consistency not in ("linearizable", "stale"):
        raise InvalidArgument("consistency must be 'linearizable' or 'stale'")
    min_revision = args.get("min_revision", 0)
    if not isinstance(min_revision, int) or isinstance(min_revision, bool) or min_revision < 0:
        raise BadRequest("min_revision must be a non-negative integer")
    return consistency == "linearizable", min_revision


def _str(args: dict[str, Any], key: str, default: str | None = None) -> str:
    value = args.get(key, default)
    if value is None:
        raise BadRequest(f"missing field {key!r}")
    if not isinstance(value, str):
        raise BadRequest(f"field {key!r} must be a string")
    return value


def _name(args: dict[str, Any], key: str) -> str:
    """A service or instance name, checked like writes check it (INVALID_NAME, not NOT_FOUND)."""
    return model.check_name(key, _str(args, key))


def _int(args: dict[str, Any], key: str) -> int:
    value = args.get(key)
    if value is None:
        raise BadRequest(f"missing field {key!r}")
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRequest(f"field {key!r} must be an integer")
    return value
