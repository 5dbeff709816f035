"""The sidecar proxy: one local TCP listener per upstream service.

Theory of operation
-------------------
For each accepted client connection the proxy stops reading from the client,
asks the upstream's ``Balancer`` for an endpoint and connects to it.  A
connect that fails (refused, unreachable, timed out) is reported to the
balancer (outlier ejection counts it) and the *same* client connection is
tried on another endpoint, up to ``attempts`` endpoints; the client sees
nothing of it but a little latency.  Only when no endpoint is left does the
proxy reset the client connection.

Once connected, bytes flow both ways through asyncio protocols, with no
task per direction: each side's ``data_received`` writes to the other side's
transport, and each transport's write-buffer limits pause reading on the
other side (so a slow reader back-pressures a fast writer instead of
filling memory).  A half-close (EOF) is passed on as a half-close; when both
directions have ended, or either side closes or resets, both are closed.

Every connection ends with one access-log line (JSON): trace id, source
service, upstream, client address, endpoint id and address, the agent's
local address of the upstream connection (what the instance sees as its
peer, so its own logs can be matched to this line), endpoints that failed
first, bytes each way, duration and outcome.

Intentions (which services may call which) belong to the auth work: the
``intentions`` hook is consulted before every connection, and the default
allows everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, cast

from .balancer import Balancer
from .endpoint import Endpoint
from .errors import ConfigError
from .metrics import AgentMetrics

__all__ = ["UpstreamProxy", "AccessLog", "Intentions", "allow_all", "os_reason"]

log = logging.getLogger("registry.agent.proxy")

#: (source service, destination service) -> may this connection proceed?
Intentions = Callable[[str, str], bool]

#: Pending connections the kernel queues per listener: bursts of new
#: connections (thousands per second) must not be refused while the loop is busy.
LISTEN_BACKLOG = 4096
#: Bytes held from a client while its endpoint is being connected; past this, reading pauses.
PENDING_BYTES_MAX = 64 * 1024


def os_reason(err: OSError) -> str:
    """"Address already in use", not uvloop's longer wrapping of it."""
    return os.strerror(err.errno).lower() if err.errno else str(err)


def allow_all(source: str, destination: str) -> bool:
    """The default intentions hook: everything is allowed (ACLs come with the auth issue)."""
    return True


class AccessLog:
    """JSON lines, buffered and flushed by ``flush()`` (the runner calls it periodically) and on close."""

    def __init__(self, path: Path | None = None, stream: IO[str] | None = None) -> None:
        assert (path is None) != (stream is None), "give a path or a stream"
        self._own = path is not None
        if path is not None:
            stream = open(path, "a", encoding="utf-8")  # closed by close()
        assert stream is not None
        self._file: IO[str] = stream
        self.lines = 0

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self.lines += 1

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._file.flush()

    def close(self) -> None:
        self.flush()
        if self._own:
            self._file.close()


def _addr(info: Any) -> str | None:
    if isinstance(info, tuple) and len(info) >= 2:
        host = str(info[0])
        return f"[{host}]:{info[1]}" if ":" in host else f"{host}:{info[1]}"
    return None


class _Relay:
    """One client connection and (once connected) its upstream connection."""

    __slots__ = (
        "bytes_down", "bytes_up", "client", "down", "down_closed", "down_eof", "endpoint", "failed", "finished",
        "local", "outcome", "pending", "pending_bytes", "proxy", "started", "task", "trace_id", "up", "up_closed",
        "up_eof",
    )

    def __init__(self, proxy: UpstreamProxy, down: asyncio.Transport) -> None:
        self.proxy = proxy
        self.down = down
        self.up: asyncio.Transport | None = None
        self.endpoint: Endpoint | None = None
        self.failed: list[str] = []
        self.bytes_up = 0
        self.bytes_down = 0
        # Only the access log needs these: skip their cost (a syscall each) without one.
        logged = proxy.access_log is not None
        self.trace_id = os.urandom(8).hex() if logged else ""
        self.started = time.monotonic()
        self.outcome = ""
        self.down_eof = False
        self.up_eof = False
        self.down_closed = False
        self.up_closed = False
        self.task: asyncio.Task[None] | None = None
        self.finished = False
        self.client = _addr(down.get_extra_info("peername")) if logged else None
        self.local: str | None = None
        #: What the client sent before an endpoint was connected (bounded: reading pauses past the limit).
        self.pending: list[bytes] = []
        self.pending_bytes = 0

    async def connect(self) -> None:
        proxy = self.proxy
        balancer = proxy.balancer
        if not proxy.intentions(proxy.source, proxy.service):
            self._refuse("denied")
            return
        loop = asyncio.get_running_loop()
        tried: list[str] = []
        for _ in range(proxy.attempts):
            endpoint = balancer.pick(tried)
            if endpoint is None:
                break
            tried.append(endpoint.id)
            stats = proxy.stats(endpoint.id)
            try:
                async with asyncio.timeout(proxy.connect_timeout_s):
                    transport, _ = await loop.create_connection(lambda: _Upstream(self), endpoint.address,
                                                                endpoint.port)
            except (OSError, TimeoutError) as err:
                balancer.report(endpoint, False)
                if stats is not None:
                    stats.failures.inc()
                self.failed.append(endpoint.id)
                log.debug("upstream %s: connect to %s (%s) failed: %r; %s", proxy.service, endpoint.id,
                          endpoint.hostport, err, "rerouting" if len(tried) < proxy.attempts else "giving up")
                continue
            balancer.report(endpoint, True)
            if self.down_closed:  # the client left while we connected
                transport.close()
                self.outcome = "client_closed"
                self.up_closed = True
                self._finish()
                return
            self.up = transport
            self.endpoint = endpoint
            if proxy.access_log is not None:
                self.local = _addr(transport.get_extra_info("sockname"))
            balancer.started(endpoint)
            if stats is not None:
                stats.connections.inc()
                stats.active.inc()
            self.outcome = "ok"
            if self.pending:
                transport.write(b"".join(self.pending))
                self.pending.clear()
            if self.down_eof:
                transport.write_eof()
            elif not self.down.is_closing():
                self.down.resume_reading()
            return
        self._refuse("connect_failed" if self.failed else "no_endpoint")

    def _refuse(self, outcome: str) -> None:
        self.outcome = outcome
        if self.proxy.metrics is not None:
            self.proxy.metrics.no_endpoint.labels(self.proxy.service, outcome).inc()
        # A reset, not a clean close: the client must not mistake it for an empty answer.
        self.down.abort()

    # -- events from the two protocols ----------------------------------------------------

    def down_data(self, data: bytes) -> None:
        self.bytes_up += len(data)
        if self.up is not None:
            self.up.write(data)
            return
        # Still connecting (uvloop reads before connection_made's pause takes effect): hold it.
        self.pending.append(data)
        self.pending_bytes += len(data)
        if self.pending_bytes >= PENDING_BYTES_MAX:
            self.down.pause_reading()

    def up_data(self, data: bytes) -> None:
        self.bytes_down += len(data)
        self.down.write(data)

    def down_eof_received(self) -> None:
        self.down_eof = True
        if self.up is not None and not self.up.is_closing():
            if self.up_eof:
                self.up.close()
                self.down.close()
            else:
                self.up.write_eof()

    def up_eof_received(self) -> None:
        self.up_eof = True
        if not self.down.is_closing():
            if self.down_eof:
                self.down.close()
                if self.up is not None:
                    self.up.close()
            else:
                self.down.write_eof()

    def down_lost(self, exc: Exception | None) -> None:
        self.down_closed = True
        if self.task is not None and not self.task.done():
            self.task.cancel()
            self.outcome = "client_closed"
            self._finish()
            return
        if exc is not None and self.outcome == "ok":
            self.outcome = "client_error"
        if self.up is not None and not self.up.is_closing():
            self.up.close()
        self._finish()

    def up_lost(self, exc: Exception | None) -> None:
        self.up_closed = True
        if exc is not None and self.outcome == "ok":
            self.outcome = "upstream_error"
        if not self.down.is_closing():
            self.down.close()
        self._finish()

    def pause_up_reading(self) -> None:
        if self.up is not None and not self.up.is_closing():
            self.up.pause_reading()

    def resume_up_reading(self) -> None:
        if self.up is not None and not self.up.is_closing():
            self.up.resume_reading()

    def pause_down_reading(self) -> None:
        if not self.down.is_closing():
            self.down.pause_reading()

    def resume_down_reading(self) -> None:
        if not self.down.is_closing():
            self.down.resume_reading()

    def _finish(self) -> None:
        if self.finished or not self.down_closed or (self.up is not None and not self.up_closed):
            return
        self.finished = True
        proxy = self.proxy
        proxy.relays.discard(self)
        endpoint = self.endpoint
        if endpoint is not None:
            proxy.balancer.finished(endpoint)
            stats = proxy.stats(endpoint.id)
            if stats is not None:
                stats.active.dec()
                stats.bytes_sent.inc(self.bytes_up)
                stats.bytes_received.inc(self.bytes_down)
        if proxy.access_log is not None:
            proxy.access_log.write({
                "ts": round(time.time(), 6),
                "trace_id": self.trace_id,
                "source": proxy.source,
                "upstream": proxy.service,
                "listen": proxy.listen,
                "client": self.client,
                "endpoint": None if endpoint is None else endpoint.id,
                "address": None if endpoint is None else endpoint.hostport,
                "local": self.local,
                "failed": self.failed,
                "bytes_up": self.bytes_up,
                "bytes_down": self.bytes_down,
                "duration_ms": round((time.monotonic() - self.started) * 1000, 3),
                "outcome": self.outcome,
            })


class _Downstream(asyncio.Protocol):
    """The client's side of a relay."""

    __slots__ = ("proxy", "relay")

    def __init__(self, proxy: UpstreamProxy) -> None:
        self.proxy = proxy
        self.relay: _Relay | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        down = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        down.pause_reading()  # nothing to send the bytes to until an endpoint is connected
        relay = _Relay(self.proxy, down)
        self.relay = relay
        self.proxy.relays.add(relay)
        relay.task = asyncio.get_running_loop().create_task(relay.connect())

    def data_received(self, data: bytes) -> None:
        assert self.relay is not None
        self.relay.down_data(data)

    def eof_received(self) -> bool:
        assert self.relay is not None
        self.relay.down_eof_received()
        return True  # keep the other direction open

    def connection_lost(self, exc: Exception | None) -> None:
        if self.relay is not None:
            self.relay.down_lost(exc)

    def pause_writing(self) -> None:
        if self.relay is not None:
            self.relay.pause_up_reading()

    def resume_writing(self) -> None:
        if self.relay is not None:
            self.relay.resume_up_reading()


class _Upstream(asyncio.Protocol):
    """The endpoint's side of a relay."""

    __slots__ = ("relay",)

    def __init__(self, relay: _Relay) -> None:
        self.relay = relay

    def data_received(self, data: bytes) -> None:
        self.relay.up_data(data)

    def eof_received(self) -> bool:
        self.relay.up_eof_received()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.relay.up is not None:
            self.relay.up_lost(exc)

    def pause_writing(self) -> None:
        self.relay.pause_down_reading()

    def resume_writing(self) -> None:
        self.relay.resume_down_reading()


class UpstreamProxy:
    def __init__(self, service: str, host: str, port: int, balancer: Balancer, *, source: str = "agent",
                 metrics: AgentMetrics | None = None, access_log: AccessLog | None = None,
                 connect_timeout_s: float = 1.0, attempts: int = 3, intentions: Intentions = allow_all) -> None:
        assert attempts >= 1
        self.service = service
        self.host = host
        self.port = port
        self.balancer = balancer
        self.source = source
        self.metrics = metrics
        self.access_log = access_log
        self.connect_timeout_s = connect_timeout_s
        self.attempts = attempts
        self.intentions = intentions
        self.relays: set[_Relay] = set()
        self._server: asyncio.Server | None = None

    @property
    def listen(self) -> str:
        return f"{self.host}:{self.port}"

    def stats(self, endpoint_id: str) -> Any:
        return None if self.metrics is None else self.metrics.endpoint(self.service, endpoint_id)

    async def start(self) -> None:
        """Bind the listener; ConfigError if the address cannot be used (in use, not local, ...)."""
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(lambda: _Downstream(self), self.host, self.port,
                                                    reuse_address=True, backlog=LISTEN_BACKLOG)
        except OSError as err:
            raise ConfigError(f"upstream {self.service}: cannot listen on {self.listen}: {os_reason(err)}") from None
        if self.port == 0:
            self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for relay in list(self.relays):
            if relay.task is not None and not relay.task.done():
                relay.task.cancel()
            relay.down.abort()
            if relay.up is not None:
                relay.up.abort()
        if self._server is not None:
            await self._server.wait_closed()
