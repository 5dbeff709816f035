"""The Python client: async, with a small sync wrapper.

Theory of operation
-------------------
A ``Client`` knows several endpoints and keeps one connection at a time.
Requests on it are multiplexed by request id, so one client can have many
in flight.  When the connection breaks, or a node answers with a retryable
error (``UNAVAILABLE``, ``NOT_LEADER``, ``TIMEOUT``), the client moves to the
next endpoint and retries until its deadline.

Retrying a write is safe because every write carries a client request id
(``rid``) that the state machine remembers: a retry of a write that did
apply returns the first outcome instead of applying again.

The client remembers the highest revision it has seen.  Stale reads ask the
node for at least that revision (``min_revision``), so what a client sees
never goes backwards, across reconnects and node changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import random
import ssl
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any, cast

import msgpack

from registry.client.calls import AsyncCalls, SyncCalls
from registry.client.wrong_port import SILENT, what_answered, wrong_port_message
from registry.config import parse_hostport
from registry.errors import ProtocolError, RegistryError, Timeout, Unavailable
from registry.fsm.model import LEASE_KEEPALIVE_IDS_MAX
from registry.protocol import (
    PROTOCOL_VERSION,
    Bye,
    Cancel,
    ClientConnection,
    Closed,
    Hello,
    HelloOk,
    NeedData,
    Request,
    Response,
    StreamEnd,
    StreamEvent,
)


def client_ssl_context(ca: str | None, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """TLS settings for a client: trust ``ca`` (system roots if None), present ``cert``/``key`` if given."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


__all__ = ["Client", "SyncClient", "ConnectionFailed", "WrongPort", "DEFAULT_ENDPOINTS", "REFUSED_GRACE_S"]

#: What ``regctl up`` starts with its defaults, so a newcomer needs no flags.
DEFAULT_ENDPOINTS = ("127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003")

#: Ops that change state; the client stamps a request id on each.
_WRITES = frozenset(
    {
        "register", "deregister", "service_put", "service_delete", "set_status", "lease_grant",
        "lease_revoke", "key_put", "key_delete", "lock_acquire", "lock_release",
    }
)
_READ_BUFFER_BYTES = 1 << 16
#: How many of a peer's first bytes are kept to recognise another protocol (see wrong_port).
_HEAD_BYTES = 8
#: How long a call keeps trying while every endpoint refuses the connection: an election never
#: does that (the nodes still listen and answer NOT_LEADER or UNAVAILABLE, which are retried until
#: the deadline); a cluster that is down, or addresses that are wrong, do.  Long enough for a few
#: retries across a momentary refusal, well under a second.
REFUSED_GRACE_S = 0.3
#: How often a connection looks for silent streams (see ``_Connection._end_silent_streams``).
_SILENCE_CHECK_S = 0.25


class ConnectionFailed(Unavailable):
    """No endpoint could be reached (a client-side error, never on the wire)."""

    code = "UNAVAILABLE"
    #: Every endpoint refused the connection or is not a registry API port: nothing to wait for.
    nothing_listens = False
    #: The endpoints that answered in another protocol (for a caller that wants to say more about them).
    wrong_ports: tuple[WrongPort, ...] = ()


class WrongPort(ConnectionFailed):
    """The endpoint answered, but not in the registry protocol (an HTTP or Raft port, say)."""

    def __init__(self, endpoint: str, answered: str) -> None:
        super().__init__(wrong_port_message(endpoint, answered))
        self.endpoint = endpoint
        self.answered = answered


def _for_caller(op: str, err: RegistryError) -> RegistryError:
    """The error a call ends with: a read that timed out says so, without the write's "outcome unknown".

    A node's TIMEOUT can say "outcome unknown" (a read barrier goes through
    the Raft log as a proposal does); for a read there is no outcome to know.
    """
    if op in _WRITES or not isinstance(err, Timeout) or "outcome unknown" not in err.message:
        return err
    return Timeout(f"{op} timed out: the node could not confirm it is up to date in time; retry", hint=err.hint)


def _unknown_if(maybe_applied: bool, err: RegistryError) -> RegistryError:
    """``err``, saying so when a write it ends had gone out on a connection that then broke."""
    if not maybe_applied or not isinstance(err, ConnectionFailed):
        return err
    unknown = ConnectionFailed(f"{err.message}; the write was sent before the connection broke: outcome "
                               "unknown (retrying it is safe: it carries a request id)", hint=err.hint)
    unknown.nothing_listens, unknown.wrong_ports = err.nothing_listens, err.wrong_ports
    return unknown


class _Stream:
    """The items of one stream, in arrival order, for one consumer.

    A deque and at most one waiter instead of an ``asyncio.Queue``: a client
    with a thousand watches gets tens of thousands of items a second, and an
    item that is already here is taken without any await.  Cancelling a
    consumer in ``get`` never loses an item nor the cancellation.
    """

    __slots__ = ("idle_s", "items", "last_item", "waiter")

    def __init__(self, idle_s: float | None = None) -> None:
        self.items: deque[tuple[str, Any]] = deque()
        self.waiter: asyncio.Future[None] | None = None
        #: The stream is ended as silent when nothing arrives for it this long (None: never).
        self.idle_s = idle_s
        self.last_item = time.monotonic()

    def put(self, kind: str, value: Any) -> None:
        self.items.append((kind, value))
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def get(self) -> tuple[str, Any]:
        while not self.items:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.waiter = waiter
            try:
                await waiter
            finally:
                if self.waiter is waiter:
                    self.waiter = None
        return self.items.popleft()


class _Recheck:
    """Set on a waiting request's future by the connection's watchdog: look around, then wait on ``future``."""

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[Any]) -> None:
        self.future = future


class _Connection:
    """One TCP connection to one node, with its codec and the requests in flight."""

    def __init__(self, endpoint: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 frame_bytes_max: int, probe_after_s: float = 1.0) -> None:
        self.endpoint = endpoint
        self._reader = reader
        self._writer = writer
        # A Packer of its own (see encode_frame); a small first buffer, as a client may hold many connections.
        self._codec = ClientConnection(frame_bytes_max=frame_bytes_max,
                                       pack=msgpack.Packer(use_bin_type=True, buf_size=4096).pack)
        #: Request id -> (the future its response or a ``_Recheck`` is delivered to, its deadline).
        self._pending: dict[int, tuple[asyncio.Future[Any], float]] = {}
        #: A node silent this long while requests wait gets probed (see ``_watchdog``).
        self._probe_after_s = probe_after_s
        #: The watchdog's timer and when it fires (monotonic); one per connection, not one per request.
        self._watch: asyncio.TimerHandle | None = None
        self._watch_at = math.inf
        #: Frames waiting for this loop pass's single write (see ``_write``).
        self._out: list[bytes] = []
        self._streams: dict[int, _Stream] = {}
        self._ids = itertools.count(1)
        self._reader_task: asyncio.Task[None] | None = None
        self._idle_task: asyncio.Task[None] | None = None
        self.node = ""
        self.closed = False
        self.close_reason: RegistryError | None = None
        #: When bytes last arrived from the node (monotonic): a silent node is probed.
        self.last_heard = time.monotonic()
        self._probe: asyncio.Task[Response] | None = None

    @classmethod
    async def open(cls, endpoint: str, token: str | None, client_name: str, timeout_s: float,
                   frame_bytes_max: int, ssl_context: ssl.SSLContext | None = None,
                   probe_after_s: float = 1.0) -> _Connection:
        host, port = parse_hostport(endpoint, what="endpoint")
        if ssl_context is None:
            opening = asyncio.open_connection(host, port)
        else:
            opening = asyncio.open_connection(host, port, ssl=ssl_context, server_hostname=host)
        # asyncio.timeout, not wait_for: in Python 3.11 wait_for swallows a cancellation that lands
        # as the connection completes, and a cancelled watch then went on running.
        async with asyncio.timeout(timeout_s):
            reader, writer = await opening
        conn = cls(endpoint, reader, writer, frame_bytes_max, probe_after_s)
        try:
            writer.write(conn._codec.send(Hello(version=PROTOCOL_VERSION, token=token, client=client_name)))
            async with asyncio.timeout(timeout_s):
                hello = await conn._read_hello()
        except BaseException:
            writer.close()
            raise
        conn.node = hello.node
        conn._reader_task = asyncio.get_running_loop().create_task(conn._read_loop())
        return conn

    async def _read_hello(self) -> HelloOk:
        # The first bytes the peer sent: they tell another protocol (HTTP, TLS) from ours (see wrong_port).
        head = b""
        while True:
            try:
                event = self._codec.next_event()
            except ProtocolError as err:
                # What a node never sends in answer to a hello (a frame too large is "HTTP" read as a length).
                raise WrongPort(self.endpoint, what_answered(head) or f"bytes that are not a hello ({err.code})",
                                ) from None
            if isinstance(event, NeedData):
                data = await self._reader.read(_READ_BUFFER_BYTES)
                if not data:
                    if not head:
                        raise WrongPort(self.endpoint, SILENT)
                    raise ConnectionFailed(f"{self.endpoint} closed the connection during hello")
                if len(head) < _HEAD_BYTES:
                    head += data[: _HEAD_BYTES - len(head)]
                    answered = what_answered(head)
                    if answered is not None:
                        raise WrongPort(self.endpoint, answered)
                self._codec.receive_data(data)
                continue
            if isinstance(event, HelloOk):
                return event
            if isinstance(event, Bye):
                raise event.error
            raise ProtocolError(f"expected hello_ok from {self.endpoint}, got {event!r:.80}")

    async def _read_loop(self) -> None:
        reason: RegistryError = ConnectionFailed(f"connection to {self.endpoint} closed")
        try:
            while True:
                data = await self._reader.read(_READ_BUFFER_BYTES)
                self.last_heard = time.monotonic()
                self._codec.receive_data(data)
                while True:
                    event = self._codec.next_event()
                    if isinstance(event, NeedData):
                        break
                    if isinstance(event, Closed):
                        raise ConnectionFailed(f"connection to {self.endpoint} closed")
                    self._dispatch(event)
                if not data:
                    break
        except RegistryError as err:
            reason = err
        except (OSError, asyncio.IncompleteReadError) as err:
            reason = ConnectionFailed(f"connection to {self.endpoint} failed: {err}")
        except asyncio.CancelledError:
            pass
        self._fail_all(reason)

    def _dispatch(self, event: Any) -> None:
        if isinstance(event, Response):
            waiting = self._pending.pop(event.id, None)
            if waiting is not None:
                if not waiting[0].done():
                    waiting[0].set_result(event)
            else:
                stream = self._streams.pop(event.id, None)
                if stream is not None:  # a stream refused before it started
                    stream.put("end", event.error)
        elif isinstance(event, StreamEvent):
            stream = self._streams.get(event.id)
            if stream is not None:
                stream.last_item = self.last_heard
                stream.put("item", event.body)
        elif isinstance(event, StreamEnd):
            stream = self._streams.pop(event.id, None)
            if stream is not None:
                stream.put("end", event.error)
        elif isinstance(event, Bye):
            raise event.error

    def _fail_all(self, reason: RegistryError) -> None:
        self.closed = True
        self.close_reason = reason
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        pending, self._pending = self._pending, {}
        for future, _ in pending.values():
            if not future.done():
                future.set_exception(reason)
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.put("end", reason)
        with contextlib.suppress(Exception):
            self._writer.close()

    async def request(self, op: str, args: dict[str, Any]) -> Response:
        """Send a request and wait for its response, however long it takes (no deadline, no probe)."""
        req_id, future = self.send_request(op, args, math.inf)
        try:
            while True:
                result = await future
                if not isinstance(result, _Recheck):
                    response: Response = result
                    return response
                future = result.future  # woken for a silent node: the caller's timeout decides
        finally:
            self._pending.pop(req_id, None)

    def send_request(self, op: str, args: dict[str, Any], deadline: float) -> tuple[int, asyncio.Future[Any]]:
        """Send a request; return its id and the future its ``Response`` will be set on.

        The caller must ``forget(id)`` when it stops waiting.  The watchdog may
        instead set a ``_Recheck`` on the future (the deadline passed, or the
        node went silent); its ``future`` then receives the response.
        """
        if self.closed:
            raise self.close_reason or ConnectionFailed("connection closed")
        req_id = next(self._ids)
        data = self._codec.send_request(req_id, op, args)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[req_id] = (future, deadline)
        if self._watch is None:
            self._arm(min(deadline, time.monotonic() + self._probe_after_s))
        elif deadline < self._watch_at:
            self._watch.cancel()
            self._arm(deadline)
        self._write(data)
        return req_id, future

    def forget(self, req_id: int) -> None:
        self._pending.pop(req_id, None)

    def _arm(self, at: float) -> None:
        self._watch_at = at
        self._watch = asyncio.get_running_loop().call_later(max(at - time.monotonic(), 0.0), self._watchdog)

    def _watchdog(self) -> None:
        """Wake the waiters whose deadline passed, and all of them if the node went silent.

        One timer per connection replaces one per request (``call_later`` and
        its cancel were a tenth of a small call's client CPU).  A node that sent
        nothing for ``probe_after_s`` while requests wait may be stopped or cut
        off with its TCP connection open; the woken waiters probe it.
        """
        self._watch = None
        self._watch_at = math.inf
        if self.closed or not self._pending:
            return
        now = time.monotonic()
        silent = now - self.last_heard >= self._probe_after_s
        next_at = now + self._probe_after_s if silent else self.last_heard + self._probe_after_s
        for req_id, (future, deadline) in list(self._pending.items()):
            if (silent or deadline <= now) and not future.done():
                fresh: asyncio.Future[Any] = future.get_loop().create_future()
                self._pending[req_id] = (fresh, deadline)
                future.set_result(_Recheck(fresh))
            elif deadline < next_at:
                next_at = deadline
        self._arm(next_at)

    def _write(self, data: bytes) -> None:
        # Frames sent in one loop pass go out in one socket write: at high
        # concurrency a response burst makes many callers send at once, and a
        # write per request was a syscall (and loopback TCP work) each.
        out = self._out
        if not out:
            asyncio.get_running_loop().call_soon(self._flush)
        out.append(data)

    def _flush(self) -> None:
        out, self._out = self._out, []
        if out and not self.closed:
            self._writer.write(out[0] if len(out) == 1 else b"".join(out))

    async def probe(self, timeout_s: float) -> None:
        """Raise TimeoutError unless the node answers a ``status`` request within ``timeout_s``.

        Concurrent callers share one probe.  ``status`` is answered locally by
        the node (no Raft round), so only a stopped, cut-off or wedged node fails it.
        """
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self.request("status", {}))
            # Retrieve the outcome even if every caller gave up waiting on it.
            self._probe.add_done_callback(lambda t: t.cancelled() or t.exception())
        # asyncio.wait neither cancels the shared probe nor wraps it in another
        # future: wait_for(shield(...)) left an outer future whose exception
        # nobody retrieved when the connection closed as the timeout fired.
        probe = self._probe
        await asyncio.wait((probe,), timeout=timeout_s)
        if not probe.done():
            raise TimeoutError(f"{self.endpoint} did not answer a status probe within {timeout_s:g}s")
        probe.result()

    def open_stream(self, op: str, args: dict[str, Any], idle_s: float | None = None) -> tuple[int, _Stream]:
        """Start a stream; with ``idle_s``, it is ended as silent if no item comes for that long."""
        if self.closed:
            raise self.close_reason or ConnectionFailed("connection closed")
        req_id = next(self._ids)
        stream = _Stream(idle_s)
        self._streams[req_id] = stream
        self._write(self._codec.send(Request(id=req_id, op=op, args=args)))
        if idle_s is not None and self._idle_task is None:
            self._idle_task = asyncio.get_running_loop().create_task(self._end_silent_streams())
        return req_id, stream

    async def _end_silent_streams(self) -> None:
        """End streams that went silent (a stopped or cut-off node may keep TCP open and quiet).

        One checker per connection rather than a timeout per awaited item: a
        timeout per item costs a task and a timer each, and ``wait_for`` in
        Python 3.11 swallows a cancellation that lands just as the item
        arrives (a cancelled watch then ran forever).
        """
        while not self.closed:
            await asyncio.sleep(_SILENCE_CHECK_S)
            now = time.monotonic()
            silent = [(i, s) for i, s in self._streams.items()
                      if s.idle_s is not None and now - s.last_item > s.idle_s]
            for req_id, stream in silent:
                self._streams.pop(req_id, None)
                stream.put("end", ConnectionFailed(f"stream {req_id} from {self.endpoint} went silent"))

    def cancel_stream(self, req_id: int) -> None:
        """Stop waiting for a stream and ask the node to end it."""
        if not self.closed and self._streams.pop(req_id, None) is not None:
            with contextlib.suppress(Exception):
                self._write(self._codec.send(Cancel(id=req_id)))  # after the stream's request

    async def close(self) -> None:
        self._flush()  # frames of this loop pass (a stream's cancel, say) still go out
        if self._idle_task is not None:
            self._idle_task.cancel()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(BaseException):
                await self._reader_task
        self._fail_all(ConnectionFailed("client closed"))


class Client(AsyncCalls):
    def __init__(
        self,
        endpoints: Sequence[str] = DEFAULT_ENDPOINTS,
        *,
        token: str | None = None,
        timeout_s: float = 10.0,
        connect_timeout_s: float = 1.0,
        client_name: str = "regctl",
        frame_bytes_max: int = 1 << 24,
        shuffle: bool = False,
        probe_after_s: float = 1.0,
        ssl_context: ssl.SSLContext | None = None,
        refused_grace_s: float = REFUSED_GRACE_S,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one endpoint is required")
        for endpoint in endpoints:
            parse_hostport(endpoint, what="endpoint")
        self.endpoints = list(endpoints)
        if shuffle:
            random.shuffle(self.endpoints)
        self.token = token
        #: TLS for the API connections (None: plain TCP).
        self.ssl_context = ssl_context
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.client_name = client_name
        self.frame_bytes_max = frame_bytes_max
        #: A request that waits this long on a node that sends nothing makes the
        #: client check that the node is alive (see ``_request``).
        self.probe_after_s = probe_after_s
        #: A call gives up once every endpoint has refused (or was not an API port) for this long.
        self.refused_grace_s = refused_grace_s
        #: Highest revision any response has carried: reads never go below it.
        self.revision_seen = 0
        self._conn: _Connection | None = None
        self._next = 0
        self._connect_lock: asyncio.Lock | None = None
        self._rid_prefix = os.urandom(6).hex()
        self._rid_counter = itertools.count(1)

    @property
    def endpoint(self) -> str | None:
        return self._conn.endpoint if self._conn is not None and not self._conn.closed else None

    def new_request_id(self) -> str:
        return f"{self._rid_prefix}-{next(self._rid_counter)}"

    async def _connection(self) -> _Connection:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            if self._conn is not None and not self._conn.closed:
                return self._conn
            errors: list[str] = []
            wrong: list[WrongPort] = []
            refused: list[str] = []
            for _ in range(len(self.endpoints)):
                endpoint = self.endpoints[self._next % len(self.endpoints)]
                self._next += 1
                try:
                    self._conn = await _Connection.open(
                        endpoint, self.token, self.client_name, self.connect_timeout_s, self.frame_bytes_max,
                        self.ssl_context, self.probe_after_s,
                    )
                    return self._conn
                except WrongPort as err:
                    wrong.append(err)
                except ConnectionRefusedError:
                    refused.append(endpoint)
                except (OSError, TimeoutError, ConnectionFailed) as err:
                    errors.append(f"{endpoint}: {err or type(err).__name__}")
            if errors:
                failed = ConnectionFailed("no endpoint reachable: " + "; ".join(
                    [*(w.message for w in wrong), *(f"{e}: connection refused" for e in refused), *errors]))
            else:
                # Nothing listens, or only the wrong protocol does: an election never looks like this.
                failed = ConnectionFailed("; ".join(
                    [*(w.message for w in wrong), *([f"connection refused by {', '.join(refused)}: no node listens "
                                                     "there"] if refused else [])]))
                failed.nothing_listens = True
            failed.wrong_ports = tuple(wrong)
            raise failed

    def _drop(self, conn: _Connection) -> None:
        if self._conn is conn:
            self._conn = None
            asyncio.get_running_loop().create_task(conn.close())

    async def call(self, op: str, args: dict[str, Any] | None = None, *, timeout_s: float | None = None,
                   retry: bool = True) -> tuple[int, Any]:
        """Send one request; return (revision, body). Retries retryable failures on other nodes."""
        args = dict(args or {})
        if op in _WRITES and "rid" not in args:
            args["rid"] = self.new_request_id()
        if args.get("consistency") == "stale" and "min_revision" not in args and self.revision_seen:
            args["min_revision"] = self.revision_seen
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else self.timeout_s)
        backoff_s = 0.02
        last: RegistryError | None = None
        #: Since when every endpoint has refused the connection (or is not an API port), or None.
        nothing_listens_since: float | None = None
        #: A write that went out on a connection that then failed may have applied.
        maybe_applied = False
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _unknown_if(maybe_applied, _for_caller(op, last or Timeout(f"{op} timed out")))
            conn: _Connection | None = None
            try:
                live = self._conn
                if live is not None and not live.closed:
                    conn = live  # the common case, without wait_for's task and timer
                else:
                    # asyncio.timeout keeps a cancel that lands as the connection completes
                    # (Python 3.11's wait_for can swallow it, and the call would carry on).
                    async with asyncio.timeout(remaining):
                        conn = await self._connection()
                response = await self._request(conn, op, args, deadline)
            except TimeoutError:
                # Only a write that was sent has an unknown outcome; a read that got no answer, or a
                # request still waiting for a connection, simply timed out.
                if conn is None:
                    last = Timeout(f"{op} timed out: no node answered the connection within the client timeout")
                elif op in _WRITES:
                    last = Timeout(f"{op}: no answer within the client timeout; outcome unknown")
                else:
                    last = Timeout(f"{op} timed out: no answer within the client timeout")
                if conn is not None:
                    self._drop(conn)
                if not retry:
                    raise last from None
                continue
            except (OSError, ConnectionFailed) as err:
                last = err if isinstance(err, RegistryError) else ConnectionFailed(str(err))
                if conn is not None:
                    self._drop(conn)
                    maybe_applied = maybe_applied or op in _WRITES
                if not retry:
                    raise _unknown_if(maybe_applied, last) from None
                if isinstance(err, ConnectionFailed) and err.nothing_listens:
                    now = time.monotonic()
                    nothing_listens_since = nothing_listens_since or now
                    if now - nothing_listens_since >= self.refused_grace_s:
                        raise _unknown_if(maybe_applied, last) from None
                else:
                    nothing_listens_since = None
                await asyncio.sleep(min(backoff_s, max(0.0, deadline - time.monotonic())))
                backoff_s = min(backoff_s * 2, 0.5)
                continue
            except ProtocolError:
                if conn is not None:
                    self._drop(conn)
                raise
            if response.revision > self.revision_seen:
                self.revision_seen = response.revision
            if response.error is None:
                return response.revision, response.body
            refused = response.error
            if refused.retryable and retry:
                last = refused
                # This node cannot serve it now (no quorum, lagging, not the
                # leader): go where the hint points, else to the next node.
                if refused.hint and refused.hint in self.endpoints:
                    self._next = self.endpoints.index(refused.hint)
                self._drop(conn)
                await asyncio.sleep(min(backoff_s, max(0.0, deadline - time.monotonic())))
                backoff_s = min(backoff_s * 2, 0.5)
                continue
            raise _for_caller(op, refused)

    async def _request(self, conn: _Connection, op: str, args: dict[str, Any], deadline: float) -> Response:
        """``conn.request`` until ``deadline``, giving up early on a node that stopped answering.

        A slow answer is normal (a write waiting for commit, a ``min_revision``
        wait), so there is no per-attempt timeout.  But a stopped or cut-off
        node keeps its TCP connection open and silent, and waiting on it would
        spend the whole deadline there.  So when nothing has arrived from the
        node for ``probe_after_s``, it must answer a ``status`` probe; if it
        does not, TimeoutError moves the call on to the next endpoint.  The
        connection's watchdog wakes this waiter for both (see ``_watchdog``).
        """
        req_id, future = conn.send_request(op, args, deadline)
        try:
            while True:
                result = await future
                if not isinstance(result, _Recheck):
                    response: Response = result
                    return response
                future = result.future
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                if time.monotonic() - conn.last_heard >= self.probe_after_s:
                    await conn.probe(min(max(self.connect_timeout_s * 2, 0.5), remaining))
        finally:
            conn.forget(req_id)

    async def stream(self, op: str, args: dict[str, Any]) -> AsyncIterator[Any]:
        """Open one stream on the current node; yields items until it ends. No resume here."""
        conn = await self._connection()
        req_id, stream = conn.open_stream(op, args)
        try:
            while True:
                kind, value = stream.items.popleft() if stream.items else await stream.get()
                if kind == "item":
                    yield value
                    continue
                if value is not None:
                    if isinstance(value, ConnectionFailed) or value.retryable:
                        self._drop(conn)
                    raise value
                return
        finally:
            conn.cancel_stream(req_id)

    async def watch(
        self,
        *,
        service: str | None = None,
        prefix: str | None = None,
        all: bool = False,
        start_revision: int | None = None,
        list_first: bool = False,
        progress_ms: int | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Watch a selection; yields stream items (created, events, snapshot, progress).

        Hides reconnects: when the node goes away, the watch resumes on another
        node from the last revision it delivered + 1, so events arrive in order,
        without gaps or duplicates; a node that has not applied that far waits
        until it has.  Runs until the caller stops iterating (or its task is
        cancelled: that always ends it).

        Items are read-only: identical watches on one client are handed the
        same decoded item (the connection decodes a repeated body once).
        """
        selector: dict[str, Any] = {}
        if service is not None:
            selector["service"] = service
        if prefix is not None:
            selector["prefix"] = prefix
        if all:
            selector["all"] = True
        next_revision = start_revision
        first = True
        announced = False
        # A node sends progress every progress_ms; silence for several of those means it is
        # stopped or cut off (its TCP connection may never break): the connection ends the
        # stream as silent and the watch resumes elsewhere.
        idle_s = 3 * (progress_ms if progress_ms is not None else 5000) / 1000.0 + 1.0
        backoff_s = 0.05
        while True:
            args = dict(selector)
            if next_revision is not None:
                args["start_revision"] = next_revision
            if list_first and first:
                args["list"] = True
            if progress_ms is not None:
                args["progress_ms"] = progress_ms
            conn: _Connection | None = None
            req_id = 0
            try:
                conn = await self._connection()
                req_id, stream = conn.open_stream("watch", args, idle_s=idle_s)
                # Pieces of a message the node split (a huge revision, a big
                # snapshot) are held back until complete; a resume starts the
                # piece over, so nothing half-done ever reaches the caller.
                partial_events: list[dict[str, Any]] = []
                snapshot_parts: list[dict[str, Any]] = []
                while True:
                    # No await when an item is already here (the common case under load).
                    kind_, value = stream.items.popleft() if stream.items else await stream.get()
                    if kind_ != "item":
                        if value is None:
                            self._drop(conn)  # the node ended the stream (shutting down): resume elsewhere
                            break
                        if isinstance(value, ConnectionFailed) or value.retryable:
                            self._drop(conn)
                        raise value
                    item: dict[str, Any] = value
                    backoff_s = 0.05
                    kind = item.get("type")
                    if kind == "events":
                        if item.get("partial"):
                            partial_events.extend(item["events"])
                            continue
                        if partial_events:
                            item = {**item, "events": partial_events + item["events"]}
                            partial_events = []
                        events = item["events"]
                        if events:
                            next_revision = int(events[-1]["revision"]) + 1
                    elif kind == "snapshot":
                        partial_events = []  # a resync replaces whatever was in flight
                        snapshot_parts.append(item)
                        if item.get("more"):
                            continue
                        item = _merge_snapshot(snapshot_parts)
                        snapshot_parts = []
                        if item.get("reason") == "list":
                            first = False
                        next_revision = max(next_revision or 0, int(item["revision"]) + 1)
                    elif kind == "progress":
                        next_revision = max(next_revision or 0, int(item["revision"]) + 1)
                    elif kind == "created" and next_revision is None:
                        next_revision = int(item["revision"]) + 1
                    if next_revision is not None and next_revision - 1 > self.revision_seen:
                        self.revision_seen = next_revision - 1
                    if kind == "created":
                        if announced:
                            continue  # a resume, not news to the caller
                        announced = True
                        if not list_first:
                            first = False
                    yield item
            except (OSError, ConnectionFailed, Unavailable):
                pass
            finally:
                if conn is not None and req_id:
                    conn.cancel_stream(req_id)
            # The stream ended (node gone or shutting down): resume elsewhere.  Only this
            # stream's own connection is dropped (above): dropping whatever connection is
            # current would also cut the watches that already resumed on a new one.
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, 1.0)

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- convenience --------------------------------------------------------

    async def register(self, service: str, instance_id: str, address: str, port: int, *,
                       meta: dict[str, str] | None = None, tags: Sequence[str] = (), weight: int = 1,
                       status: str = "passing", lease: int | None = None,
                       if_mod_revision: int | None = None) -> dict[str, Any]:
        args: dict[str, Any] = {"service": service, "id": instance_id, "address": address, "port": port,
                                "meta": dict(meta or {}), "tags": list(tags), "weight": weight, "status": status}
        if lease is not None:
            args["lease"] = lease
        if if_mod_revision is not None:
            args["if_mod_revision"] = if_mod_revision
        _, body = await self.call("register", args)
        result: dict[str, Any] = body
        return result

    async def deregister(self, service: str, instance_id: str) -> dict[str, Any]:
        _, body = await self.call("deregister", {"service": service, "id": instance_id})
        result: dict[str, Any] = body
        return result

    async def set_status(self, service: str, instance_id: str, status: str, note: str = "") -> dict[str, Any]:
        """Report an instance's health (passing / warning / critical); ``changed`` is false for a repeat."""
        _, body = await self.call("set_status", {"service": service, "id": instance_id, "status": status,
                                                 "note": note})
        result: dict[str, Any] = body
        return result

    async def get_service(self, name: str, *, consistency: str = "linearizable",
                          min_revision: int | None = None) -> tuple[int, dict[str, Any]]:
        args: dict[str, Any] = {"name": name, "consistency": consistency}
        if min_revision is not None:
            args["min_revision"] = min_revision
        revision, body = await self.call("service_get", args)
        return revision, body

    async def list_services(self, *, consistency: str = "linearizable") -> tuple[int, list[dict[str, Any]]]:
        revision, body = await self.call("service_list", {"consistency": consistency})
        return revision, body

    async def lease_grant(self, ttl_ms: int) -> int:
        _, body = await self.call("lease_grant", {"ttl_ms": ttl_ms})
        return int(body["lease"])

    async def lease_keepalive(self, lease: int) -> int:
        """Renew a lease once (served by the leader); return its TTL in ms."""
        _, body = await self.call("lease_keepalive", {"lease": lease})
        return int(body["ttl_ms"])

    async def lease_keepalive_many(self, leases: Sequence[int], *, timeout_s: float | None = None,
                                   retry: bool = True) -> dict[str, Any]:
        """Renew many leases with one request per ``LEASE_KEEPALIVE_IDS_MAX`` ids (served by the leader).

        Returns ``{"renewed": n, "ttl_ms": [ttl per id, in order; 0 = missing], "missing": [ids]}``:
        a lease that is gone (expired, revoked, unknown) is listed in ``missing``
        rather than failing the others.  Like every call it follows ``NOT_LEADER``
        hints, so it keeps talking to the leader.
        """
        ids = list(leases)
        renewed = 0
        ttls: list[int] = []
        missing: list[int] = []
        for start in range(0, len(ids), LEASE_KEEPALIVE_IDS_MAX):
            chunk = ids[start : start + LEASE_KEEPALIVE_IDS_MAX]
            _, body = await self.call("lease_keepalive_batch", {"leases": chunk}, timeout_s=timeout_s,
                                      retry=retry)
            renewed += int(body["renewed"])
            ttls.extend(body["ttl_ms"])
            missing.extend(body["missing"])
        return {"renewed": renewed, "ttl_ms": ttls, "missing": missing}

    async def lease_revoke(self, lease: int) -> dict[str, Any]:
        _, body = await self.call("lease_revoke", {"lease": lease})
        result: dict[str, Any] = body
        return result

    async def node_status(self, endpoint: str) -> dict[str, Any]:
        """Status of one node, asked directly (no failover: the point is that node)."""
        conn = await _Connection.open(endpoint, self.token, self.client_name, self.connect_timeout_s,
                                      self.frame_bytes_max, self.ssl_context)
        try:
            async with asyncio.timeout(self.connect_timeout_s * 2):
                response = await conn.request("status", {})
        finally:
            await conn.close()
        if response.error is not None:
            raise response.error
        status: dict[str, Any] = response.body
        return status

    async def cluster_status(self) -> list[dict[str, Any]]:
        """Status of every endpoint; unreachable ones say so instead of failing the call."""

        async def one(endpoint: str) -> dict[str, Any]:
            try:
                status = await self.node_status(endpoint)
                status["reachable"] = True
                return status
            except (OSError, TimeoutError, RegistryError) as err:
                return {"api": endpoint, "reachable": False, "error": str(err) or type(err).__name__}

        return list(await asyncio.gather(*(one(e) for e in self.endpoints)))


def _merge_snapshot(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One snapshot item from the parts the node sent (a service may span parts)."""
    merged: dict[str, dict[str, Any]] = {}
    keys: list[dict[str, Any]] = []
    for part in parts:
        for svc in part.get("services", []):
            name = svc["service"]["name"]
            if name in merged:
                merged[name]["instances"].extend(svc["instances"])
            else:
                merged[name] = {"service": svc["service"], "instances": list(svc["instances"])}
        keys.extend(part.get("keys", []))
    last = parts[-1]
    out = {k: v for k, v in last.items() if k not in ("services", "keys", "more")}
    out["services"] = list(merged.values())
    out["keys"] = keys
    return out


class SyncClient(SyncCalls):
    """Blocking wrapper for scripts and the CLI: one private event loop."""

    client: Client

    def __init__(self, endpoints: Sequence[str] = DEFAULT_ENDPOINTS, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self.client = Client(endpoints, **kwargs)

    def _run(self, coro: Any) -> Any:
        return self._loop.run_until_complete(coro)

    def call(self, op: str, args: dict[str, Any] | None = None, **kwargs: Any) -> tuple[int, Any]:
        result: tuple[int, Any] = self._run(self.client.call(op, args, **kwargs))
        return result

    def register(self, service: str, instance_id: str, address: str, port: int, **kwargs: Any) -> dict[str, Any]:
        result: dict[str, Any] = self._run(self.client.register(service, instance_id, address, port, **kwargs))
        return result

    def deregister(self, service: str, instance_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._run(self.client.deregister(service, instance_id))
        return result

    def set_status(self, service: str, instance_id: str, status: str, note: str = "") -> dict[str, Any]:
        result: dict[str, Any] = self._run(self.client.set_status(service, instance_id, status, note))
        return result

    def get_service(self, name: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
        result: tuple[int, dict[str, Any]] = self._run(self.client.get_service(name, **kwargs))
        return result

    def list_services(self, **kwargs: Any) -> tuple[int, list[dict[str, Any]]]:
        result: tuple[int, list[dict[str, Any]]] = self._run(self.client.list_services(**kwargs))
        return result

    def lease_grant(self, ttl_ms: int) -> int:
        return int(self._run(self.client.lease_grant(ttl_ms)))

    def lease_keepalive(self, lease: int) -> int:
        return int(self._run(self.client.lease_keepalive(lease)))

    def lease_keepalive_many(self, leases: Sequence[int], **kwargs: Any) -> dict[str, Any]:
        result: dict[str, Any] = self._run(self.client.lease_keepalive_many(leases, **kwargs))
        return result

    def lease_revoke(self, lease: int) -> dict[str, Any]:
        result: dict[str, Any] = self._run(self.client.lease_revoke(lease))
        return result

    def node_status(self, endpoint: str) -> dict[str, Any]:
        result: dict[str, Any] = self._run(self.client.node_status(endpoint))
        return result

    def cluster_status(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._run(self.client.cluster_status())
        return result

    def stream(self, op: str, args: dict[str, Any]) -> Any:
        agen = cast(AsyncGenerator[Any, None], self.client.stream(op, args))
        try:
            while True:
                try:
                    yield self._run(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            # Interrupted mid-step (Ctrl-C): the generator may still be running.
            with contextlib.suppress(RuntimeError, RegistryError, OSError):
                self._run(agen.aclose())

    def watch(self, **kwargs: Any) -> Any:
        """Blocking generator over ``Client.watch``."""
        agen = cast(AsyncGenerator[Any, None], self.client.watch(**kwargs))
        step: asyncio.Future[Any] | None = None
        try:
            while True:
                step = asyncio.ensure_future(agen.__anext__(), loop=self._loop)
                try:
                    yield self._run(step)
                except StopAsyncIteration:
                    return
        finally:
            # Interrupted mid-step (Ctrl-C): finish the pending step (cancelled) first, so the
            # generator can be closed and no task is left to fail unobserved at exit.
            if step is not None and not step.done():
                step.cancel()
                with contextlib.suppress(BaseException):
                    self._run(step)
            with contextlib.suppress(RuntimeError, RegistryError, OSError):
                self._run(agen.aclose())

    @property
    def revision_seen(self) -> int:
        return self.client.revision_seen

    def close(self) -> None:
        if self._loop.is_closed():
            return  # closed already (a with block and its owner both close it)
        try:
            self._run(self.client.close())
        finally:
            self._loop.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
