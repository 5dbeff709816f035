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
from typing import TYPE_CHECKING, Any, cast

from .acl import hash_secret
from .api import CURRENT_AUTH, CURRENT_PEER, RegistryAPI
from .errors import Conflict, Internal, NotFound, PermissionDenied, RegistryError, Unauthenticated
from .metrics import NodeMetrics
from .protocol import (
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

if TYPE_CHECKING:
    from .acl_service import AclService

__all__ = ["APIServer", "StreamSink", "StreamHandler"]

log = logging.getLogger("registry.server")

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

    def send(self, body: Any) -> None:
        self._proto.write_event(StreamEvent(self.request_id, body))

    async def drain(self) -> None:
        await self._proto.drained()

    @property
    def closed(self) -> bool:
        return self._proto.closed


StreamHandler = Callable[[dict[str, Any], StreamSink], Awaitable[None]]
#: Checks a hello's token; returns the principal (opaque) or raises Unauthenticated.
TokenCheck = Callable[[str | None], Any]


class _ClientProtocol(asyncio.Protocol):
    def __init__(self, server: APIServer) -> None:
        self._server = server
        self._conn = ServerConnection(frame_bytes_max=server.frame_bytes_max)
        self._transport: asyncio.Transport | None = None
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
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
        self._server.connection_opened(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
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
                task = asyncio.get_running_loop().create_task(self._run(event))
                self._tasks[event.id] = task
            elif isinstance(event, Hello):
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
                log.info("request failed: op=%s rid=%s code=%s: %s", req.op, req.args.get("rid"), err.code,
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
                log.warning("slow request: op=%s rid=%s took %.3fs", req.op, req.args.get("rid"), elapsed_s)
            op = req.op if req.op in server.known_ops else "other"
            server.metrics.requests.labels(op=op, code=code).inc()
            server.metrics.request_seconds.labels(op=op).observe(time.perf_counter() - started)

    def _reply_error(self, req: Request, err: RegistryError, *, stream: bool) -> None:
        if stream:
            self.write_event(StreamEnd(req.id, err))
        else:
            self.write_event(Response(req.id, self._server.api.revision, error=err))

    def write_event(self, event: Any) -> None:
        if self.closed:
            return
        try:
            data = self._conn.send(event)
        except RegistryError as err:
            # The body is too large for one frame: tell the client instead.
            req_id = getattr(event, "id", None)
            if isinstance(req_id, int):
                data = self._conn.send(Response(req_id, self._server.api.revision, error=err))
            else:
                return
        self._write_bytes(data)

    def _write_bytes(self, data: bytes) -> None:
        if self._transport is not None and not self.closed:
            self._transport.write(data)

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
        token_check: TokenCheck | None = None,
        acl: AclService | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.api = api
        self.metrics = metrics
        self.frame_bytes_max = frame_bytes_max
        self.connections_max = connections_max
        self.streams: dict[str, StreamHandler] = {}
        self.known_ops: set[str] = set()
        self._token_check = token_check
        #: With ACLs on: every request is authorized (see registry.acl_service).
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

    def connection_opened(self, proto: _ClientProtocol) -> None:
        if len(self._clients) >= self.connections_max:
            log.warning("refusing client: %d connections open (limit)", len(self._clients))
            proto.close()
            return
        self._clients.add(proto)
        self.metrics.connections.set(len(self._clients))

    def connection_closed(self, proto: _ClientProtocol) -> None:
        self._clients.discard(proto)
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
