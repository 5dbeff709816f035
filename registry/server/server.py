"""The asyncio API server: a thin shell around the sans-IO protocol.

Each connection owns one ``ServerConnection`` codec.  Bytes in are fed to it;
each ``Request`` event runs as its own task (requests on one connection are
concurrent, which is what lets one client fill a group-commit batch); each
response is encoded by the codec and written.  A broken byte stream
(garbage, an oversized frame) gets a ``Bye`` with the error and the
connection is closed; a well-framed but wrong message gets an error response
and the connection stays.  Nothing a client sends can raise out of here.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import msgpack

from registry.errors import (
    Conflict,
    Internal,
    NotFound,
    PermissionDenied,
    ProtocolError,
    RegistryError,
    Unauthenticated,
)
from registry.fsm.acl import hash_secret
from registry.fsm.model import RID_CHARS_MAX
from registry.protocol import (
    BadMessage,
    Bye,
    Cancel,
    Closed,
    Hello,
    HelloOk,
    NeedData,
    Request,
    Response,
    ServerConnection,
    StreamEnd,
    StreamEvent,
)
from registry.protocol.shared import frame_shared_bodies, shared_frame_prefix, stream_event_head
from registry.server.api import CURRENT_AUTH, CURRENT_PEER, Deferred, RegistryAPI, Started
from registry.server.metrics import NodeMetrics

if TYPE_CHECKING:
    from registry.server.acl_service import AclService

__all__ = ["APIServer", "StreamSink", "StreamHandler", "InlineHandler"]

log = logging.getLogger("registry.server.server")

#: Requests slower than this are logged with their request id.
SLOW_REQUEST_S = 1.0

#: Bytes buffered for a client before we stop reading its requests and make
#: its streams wait: a slow reader must not grow our memory without bound.
WRITE_BUFFER_HIGH_BYTES = 4 << 20


class StreamSink:
    """What a stream handler (watch, keepalive) uses to send items."""

    def __init__(self, proto: _ClientProtocol, request_id: int) -> None:
        self._proto = proto
        self.request_id = request_id
        self._head = stream_event_head(request_id)

    def send(self, body: Any) -> None:
        self._proto.write_event(StreamEvent(self.request_id, body))

    def send_encoded(self, body: bytes) -> None:
        """Send an item already encoded as msgpack (shared by many streams; see protocol.shared).

        Queued with the connection's other stream frames and written once per
        loop pass: a publish that reaches 500 streams on one connection makes
        one socket write, not 500.  Raises ``FrameTooLarge`` if it cannot fit.
        """
        self._proto.write_stream_frame(self._head, body)

    def try_send_encoded(self, bodies: list[bytes]) -> bool:
        """Send encoded items now if the client keeps up; else send nothing and return False.

        "Keeps up": the connection's buffers are below their high-water mark,
        so a client that stops reading makes its watches queue (bounded) rather
        than grow this node's memory.
        """
        return self._proto.try_write_stream_frames(self._head, bodies)

    async def drain(self) -> None:
        await self._proto.drained()

    @property
    def closed(self) -> bool:
        return self._proto.closed


StreamHandler = Callable[[dict[str, Any], StreamSink], Awaitable[None]]
#: A synchronous op (memory only, never waits): args -> (revision, body); raises RegistryError.
#: The body must be in the protocol's data model (built from checked values, never echoed input):
#: it is encoded without the model walk.
InlineHandler = Callable[[dict[str, Any]], tuple[int, Any]]
#: Checks a hello's token; returns the principal (opaque) or raises Unauthenticated.
TokenCheck = Callable[[str | None], Any]


def _rid(args: dict[str, Any]) -> str | None:
    """A request's client request id for a log line: a write's args reach the handler unwalked
    (``registry.fsm.ops.WRITE_OPS``), so a failing one may carry anything there, even deeply nested."""
    rid = args.get("rid")
    return rid[:RID_CHARS_MAX] if isinstance(rid, str) else None


def _cancelled() -> Started:
    raise asyncio.CancelledError


class _ClientProtocol(asyncio.Protocol):
    def __init__(self, server: APIServer) -> None:
        self._server = server
        #: Until the hello: bytes received, and the timer that closes a connection that never says it.
        self._hello_seen = False
        self._prehello_bytes = 0
        self._hello_timer: asyncio.TimerHandle | None = None
        #: The client's address without its port: the per-source connection cap counts by it.
        self.source = "unknown"
        self._conn = ServerConnection(frame_bytes_max=server.frame_bytes_max, pack=server.pack,
                                      checked_ops=server.api.field_checked_ops)
        self._transport: asyncio.Transport | None = None
        #: Requests in progress by id: their tasks, or the futures fast-path requests wait on.
        self._tasks: dict[int, asyncio.Future[Any]] = {}
        self._paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        #: Stream frames waiting for this loop pass's single write (see ``write_stream_frame``).
        self._stream_out: list[bytes] = []
        self._stream_out_bytes = 0
        self.closed = False
        self.principal: Any = None
        self.peer = "unknown"

    # -- asyncio.Protocol -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport is not an asyncio.Transport subclass.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH_BYTES)
        peername = transport.get_extra_info("peername")
        if isinstance(peername, tuple) and len(peername) >= 2:
            self.peer = f"{peername[0]}:{peername[1]}"
            self.source = str(peername[0])
        if self._server.connection_opened(self):
            self._hello_timer = asyncio.get_running_loop().call_later(self._server.hello_timeout_s,
                                                                      self._hello_expired)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_hello_timer()
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()
        self._wake_drainers()
        self._server.connection_closed(self)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_drainers()

    def data_received(self, data: bytes) -> None:
        self._conn.receive_data(data)
        self._process()
        if not self._hello_seen and not self.closed:
            # A partial frame before the hello could hold a whole frame limit (1 MiB) per socket.
            self._prehello_bytes += len(data)
            if self._prehello_bytes > self._server.hello_bytes_max:
                self._refuse_before_hello("prehello_bytes", f"more than {self._server.hello_bytes_max} bytes "
                                          "before a hello (hello_bytes_max)")

    def _cancel_hello_timer(self) -> None:
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None

    def _hello_expired(self) -> None:
        self._hello_timer = None
        if not self._hello_seen and not self.closed:
            self._refuse_before_hello("hello_timeout", f"no hello within {self._server.hello_timeout_s:g} s "
                                      "(hello_timeout_s)")

    def _refuse_before_hello(self, reason: str, why: str) -> None:
        self._server.metrics.connections_refused.labels(reason=reason).inc()
        log.info("closing client connection from %s: %s", self.peer, why)
        self._goodbye(ProtocolError(why))

    def eof_received(self) -> bool | None:
        self._conn.receive_data(b"")
        self._process()
        return None

    # -- internals ------------------------------------------------------------

    def _process(self) -> None:
        while not self.closed:
            try:
                event = self._conn.next_event()
            except RegistryError as err:
                self._server.metrics.bad_frames.inc()
                log.info("closing client connection: %s", err.message)
                self._goodbye(err)
                return
            if isinstance(event, NeedData):
                return
            if isinstance(event, Closed):
                self.close()
                return
            if isinstance(event, Request):
                if self._server.checks_tokens and self.principal is None:
                    self.write_event(Response(event.id, self._server.api.revision,
                                              error=Unauthenticated("no valid token")))
                    continue
                inline = self._server.inline.get(event.op)
                if inline is not None and self._server.acl is None:
                    # Memory-only ops (lease keepalives) are answered right here.
                    # With ACLs on they take the task path: authorization may await.
                    self._run_inline(event, inline)
                    continue
                if self._server.acl is None and event.op not in self._server.streams:
                    starter = self._server.api.starter(event.op)
                    if starter is not None:
                        # Built-in reads and writes: no task (see _advance).
                        self._advance(event, time.perf_counter(), partial(starter, event.args))
                        continue
                task = asyncio.get_running_loop().create_task(self._run(event))
                self._tasks[event.id] = task
            elif isinstance(event, Hello):
                self._hello_seen = True
                self._cancel_hello_timer()
                try:
                    self.principal = self._server.check_token(event.token)
                except RegistryError as err:
                    self._goodbye(err)
                    return
                self.write_event(HelloOk(version=event.version, node=self._server.api.info.node_id,
                                         revision=self._server.api.revision))
            elif isinstance(event, Cancel):
                cancelled = self._tasks.pop(event.id, None)
                if cancelled is not None:
                    cancelled.cancel()
                    self.write_event(StreamEnd(event.id, None))
            elif isinstance(event, BadMessage):
                if event.id is not None:
                    self.write_event(Response(event.id, self._server.api.revision, error=event.error))
                else:
                    self._goodbye(event.error)
                    return

    def _goodbye(self, err: RegistryError) -> None:
        try:
            self._write_bytes(self._conn.send(Bye(err)))
        except RegistryError:
            pass
        self.close()

    async def _run(self, req: Request) -> None:
        server = self._server
        started = time.perf_counter()
        code = "OK"
        acl = server.acl
        principal = self.principal if isinstance(self.principal, str) else ""
        try:
            if acl is not None:
                # Only with ACLs on: each request runs in its own task, so these stay per request.
                CURRENT_AUTH.set(principal or None)
                CURRENT_PEER.set(self.peer)
                await acl.before(req.op, req.args, principal)
            stream = server.streams.get(req.op)
            if stream is not None:
                await stream(req.args, StreamSink(self, req.id))
                self.write_event(StreamEnd(req.id, None))
            else:
                revision, body = await server.api.handle(req.op, req.args)
                if acl is not None:
                    body = acl.filter_result(req.op, body, principal)
                    acl.succeeded(req.op, req.args, principal, self.peer)
                self.write_event(Response(req.id, revision, body=body))
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except RegistryError as err:
            code = err.code
            if acl is not None and isinstance(err, (Unauthenticated, PermissionDenied)):
                acl.denied(req.op, req.args, principal, self.peer, err)
            if not isinstance(err, (NotFound, Conflict)):
                log.info("request failed: op=%s rid=%s code=%s: %s", req.op, _rid(req.args), err.code,
                         err.message)
            self._reply_error(req, err, stream=req.op in server.streams)
        except Exception as err:
            code = Internal.code
            log.exception("request %s failed", req.op)
            self._reply_error(req, Internal(f"internal error: {type(err).__name__}"), stream=req.op in server.streams)
        finally:
            self._tasks.pop(req.id, None)
            elapsed_s = time.perf_counter() - started
            if elapsed_s > SLOW_REQUEST_S and req.op not in server.streams:
                log.warning("slow request: op=%s rid=%s took %.3fs", req.op, _rid(req.args), elapsed_s)
            op = req.op if req.op in server.known_ops else "other"
            server.metrics.request_done(op, code, elapsed_s)

    def _advance(self, req: Request, started: float, step: Callable[[], Started]) -> None:
        """Run a request of the API's task-free form (``RegistryAPI.starter``) one step on.

        ``step`` gives the answer or a ``Deferred``; a pending one resumes here
        from its future's done-callback.  A task per request (creation, a
        scheduling round per await, four coroutine frames) cost ~10 us; this
        costs a callback.  Errors, cancellation (a ``Cancel`` or the connection
        closing cancels the future), metrics and logs are those of ``_run``.
        """
        code = "OK"
        try:
            value = step()
            while isinstance(value, Deferred):
                future = value.future
                if not future.done():
                    self._tasks[req.id] = future
                    future.add_done_callback(partial(self._resumed, req, started, value))
                    return
                value = value.finish(future)
            revision, body = value
            # Built-in ops answer with state records and results, in the data model by construction.
            self.write_event(Response(req.id, revision, body=body), body_in_model=True)
        except asyncio.CancelledError:
            code = "CANCELLED"
        except RegistryError as err:
            code = err.code
            if not isinstance(err, (NotFound, Conflict)):
                log.info("request failed: op=%s rid=%s code=%s: %s", req.op, _rid(req.args), err.code,
                         err.message)
            self._reply_error(req, err, stream=False)
        except Exception as err:
            code = Internal.code
            log.exception("request %s failed", req.op)
            self._reply_error(req, Internal(f"internal error: {type(err).__name__}"), stream=False)
        server = self._server
        elapsed_s = time.perf_counter() - started
        if elapsed_s > SLOW_REQUEST_S:
            log.warning("slow request: op=%s rid=%s took %.3fs", req.op, _rid(req.args), elapsed_s)
        server.metrics.request_done(req.op if req.op in server.known_ops else "other", code, elapsed_s)

    def _resumed(self, req: Request, started: float, deferred: Deferred, future: asyncio.Future[Any]) -> None:
        step: Callable[[], Started]
        if self._tasks.get(req.id) is future:
            del self._tasks[req.id]
            step = partial(deferred.finish, future)
        else:
            # Withdrawn by a Cancel or the connection closing, possibly after the
            # future completed: no answer, as for a cancelled task.
            if not future.cancelled():
                future.exception()  # retrieved: no "exception was never retrieved" log
            step = _cancelled
        self._advance(req, started, step)

    def _run_inline(self, req: Request, handler: InlineHandler) -> None:
        """Answer a synchronous op while its frame is parsed: no task, no await, no labels() lookup.

        At tens of thousands of keepalives a second, a task per request and
        the Prometheus calls cost more than the keepalive itself.  Inline ops
        are counted in ``regctl_requests_total`` but not timed: they never
        wait, so their latency is the network's.
        """
        server = self._server
        code = "OK"
        try:
            revision, body = handler(req.args)
            self.write_event(Response(req.id, revision, body=body), body_in_model=True)
        except RegistryError as err:
            code = err.code
            if not isinstance(err, (NotFound, Conflict)):
                log.info("request failed: op=%s code=%s: %s", req.op, err.code, err.message)
            self.write_event(Response(req.id, server.api.revision, error=err))
        except Exception as err:
            code = Internal.code
            log.exception("request %s failed", req.op)
            internal = Internal(f"internal error: {type(err).__name__}")
            self.write_event(Response(req.id, server.api.revision, error=internal))
        server.count_inline(req.op, code)

    def _reply_error(self, req: Request, err: RegistryError, *, stream: bool) -> None:
        if stream:
            self.write_event(StreamEnd(req.id, err))
        else:
            self.write_event(Response(req.id, self._server.api.revision, error=err))

    def write_event(self, event: Any, *, body_in_model: bool = False) -> None:
        if self.closed:
            return
        try:
            data = self._conn.send(event, body_in_model=body_in_model)
        except RegistryError as err:
            # The body is too large for one frame: tell the client instead.
            req_id = getattr(event, "id", None)
            if isinstance(req_id, int):
                data = self._conn.send(Response(req_id, self._server.api.revision, error=err))
            else:
                return
        self._write_bytes(data)

    def _write_bytes(self, data: bytes) -> None:
        # Responses join the frames queued for this loop pass (stream frames
        # too, so order is kept): a committed batch answers hundreds of requests
        # in one pass, and one socket write per connection instead of one per
        # response saves a syscall (~5-10 us) each.  close() flushes first.
        if self._transport is None or self.closed:
            return
        out = self._stream_out
        if not out:
            asyncio.get_running_loop().call_soon(self._flush_streams)
        out.append(data)
        self._stream_out_bytes += len(data)

    def write_stream_frame(self, head: bytes, body: bytes) -> None:
        if self.closed:
            return
        prefix = shared_frame_prefix(head, len(body), self._server.frame_bytes_max)
        out = self._stream_out
        if not out:
            asyncio.get_running_loop().call_soon(self._flush_streams)
        out.append(prefix)
        out.append(body)
        self._stream_out_bytes += len(prefix) + len(body)

    def try_write_stream_frames(self, head: bytes, bodies: list[bytes]) -> bool:
        if self.closed or self._paused or self._stream_out_bytes >= WRITE_BUFFER_HIGH_BYTES:
            return False
        framed = frame_shared_bodies(head, bodies, self._server.frame_bytes_max)
        if framed is None:
            return False  # the stream's task sends it, and fails the stream with FRAME_TOO_LARGE
        parts, size = framed
        out = self._stream_out
        if not out:
            asyncio.get_running_loop().call_soon(self._flush_streams)
        out.extend(parts)
        self._stream_out_bytes += size
        return True

    def _flush_streams(self) -> None:
        out = self._stream_out
        if not out:
            return
        self._stream_out = []
        self._stream_out_bytes = 0
        if self._transport is not None and not self.closed:
            self._transport.write(b"".join(out))

    async def drained(self) -> None:
        if not self._paused or self.closed:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._drain_waiters.append(future)
        await future

    def _wake_drainers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)

    def close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._flush_streams()  # queued replies (a bye) go out before the close
            self._transport.close()
        self.closed = True


class APIServer:
    def __init__(
        self,
        api: RegistryAPI,
        metrics: NodeMetrics,
        *,
        frame_bytes_max: int,
        connections_max: int,
        connections_per_source_max: int | None = None,
        hello_timeout_s: float = 5.0,
        hello_bytes_max: int = 64 << 10,
        token_check: TokenCheck | None = None,
        acl: AclService | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.api = api
        self.metrics = metrics
        self.frame_bytes_max = frame_bytes_max
        self.connections_max = connections_max
        #: One address may hold at most this many (None: connections_max), so one host cannot lock out the rest.
        self.connections_per_source_max = connections_per_source_max or connections_max
        self.hello_timeout_s = hello_timeout_s
        self.hello_bytes_max = hello_bytes_max
        self._per_source: dict[str, int] = {}
        self.streams: dict[str, StreamHandler] = {}
        #: Ops answered inline, without a task (see _ClientProtocol._run_inline).
        self.inline: dict[str, InlineHandler] = {}
        #: Encodes every connection's frames: all of them run on this server's loop thread.
        self.pack: Callable[[Any], bytes] = msgpack.Packer(use_bin_type=True).pack
        self.known_ops: set[str] = set()
        self._token_check = token_check
        #: With ACLs on: every request is authorized (see registry.server.acl_service).
        self.acl = acl
        self._ssl = ssl_context
        self._clients: set[_ClientProtocol] = set()
        self._server: asyncio.Server | None = None

    @property
    def checks_tokens(self) -> bool:
        return self._token_check is not None or self.acl is not None

    def check_token(self, token: str | None) -> Any:
        if self.acl is not None:
            # The principal is the token's hash ("" for none); each request is authorized against the
            # replicated state, so a token revoked after the hello fails on its next request.
            return hash_secret(token) if token else ""
        if self._token_check is None:
            return True
        return self._token_check(token)

    def add_stream(self, op: str, handler: StreamHandler) -> None:
        self.streams[op] = handler

    def add_inline(self, op: str, handler: InlineHandler) -> None:
        """Serve ``op`` inline (no ACLs) with ``handler``; the API keeps its async handler for the rest."""
        self.inline[op] = handler

    def count_inline(self, op: str, code: str) -> None:
        # An int add in RequestStats; a Prometheus Counter.inc() took ~2 us (a lock per call).
        self.metrics.requests.count(op if op in self.known_ops else "other", code)

    def connection_opened(self, proto: _ClientProtocol) -> bool:
        """Admit a new connection, or close it at once (False) if a cap is reached."""
        if len(self._clients) >= self.connections_max:
            self.metrics.connections_refused.labels(reason="total").inc()
            log.warning("refusing client: %d connections open (limit)", len(self._clients))
            proto.close()
            return False
        held = self._per_source.get(proto.source, 0)
        if held >= self.connections_per_source_max:
            self.metrics.connections_refused.labels(reason="per_source").inc()
            log.warning("refusing client %s: %d connections open from that address (connections_per_source_max)",
                        proto.peer, held)
            proto.close()
            return False
        self._per_source[proto.source] = held + 1
        self._clients.add(proto)
        self.metrics.connections.set(len(self._clients))
        return True

    def connection_closed(self, proto: _ClientProtocol) -> None:
        if proto in self._clients:
            self._clients.discard(proto)
            left = self._per_source.get(proto.source, 1) - 1
            if left > 0:
                self._per_source[proto.source] = left
            else:
                self._per_source.pop(proto.source, None)
        self.metrics.connections.set(len(self._clients))

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _ClientProtocol(self), host, port, reuse_address=True,
                                                ssl=self._ssl)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for proto in list(self._clients):
            proto.close()
        if self._server is not None:
            await self._server.wait_closed()
