"""The sidecar proxy: one local TCP listener per upstream service.

Theory of operation
-------------------
For each accepted client connection the proxy asks the upstream's
``Balancer`` for an endpoint and connects to it; what the client sends
meanwhile is held (reading pauses past ``PENDING_BYTES_MAX``).  A
connect that fails (refused, unreachable, timed out) is reported to the
balancer (outlier ejection counts it) and the *same* client connection is
tried on another endpoint, up to ``attempts`` endpoints; the client sees
nothing of it but a little latency.  Only when no endpoint is left does the
proxy reset the client connection.

Everything per connection is callbacks, with no task or coroutine of the
proxy's own: the connect is ``loop.create_connection`` stepped by the
relay itself (``_Relay._step``), and its timeout is one timer per proxy
over a FIFO queue of deadlines (``UpstreamProxy.watch_deadline``).  At
thousands of new connections per second a task, a timeout context and a
timer handle per connection were a large share of the agent's CPU.

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
import random
import time
from collections import deque
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import IO, Any, cast

from registry.agent.balancer import Balancer
from registry.agent.endpoint import Endpoint
from registry.agent.errors import ConfigError
from registry.agent.metrics import AgentMetrics, EndpointMetrics

__all__ = ["UpstreamProxy", "AccessLog", "Intentions", "allow_all", "os_reason"]

log = logging.getLogger("registry.agent.proxy")

#: (source service, destination service) -> may this connection proceed?
Intentions = Callable[[str, str], bool]

#: Pending connections the kernel queues per listener: bursts of new
#: connections (thousands per second) must not be refused while the loop is busy.
LISTEN_BACKLOG = 4096
#: Bytes held from a client while its endpoint is being connected; past this, reading pauses.
PENDING_BYTES_MAX = 64 * 1024


#: Trace ids only need to be unique, not unguessable: a PRNG (seeded from os.urandom) instead of a
#: getrandom syscall per connection.  Its own instance, so nothing seeding the global one repeats them.
_trace_ids = random.Random()


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


class _Relay(asyncio.Protocol):
    """One client connection (this is its protocol) and, once connected, its upstream connection.

    Everything per connection is a callback on this object: no task, no
    coroutine of our own, no timeout context manager.  At thousands of new
    connections per second those (and the allocations behind them, which
    also make the garbage collector run more often) were a large share of
    the agent's CPU per connection.
    """

    __slots__ = (
        "bytes_down", "bytes_up", "client", "connecting", "down", "down_closed", "down_eof", "endpoint", "failed",
        "finished", "local", "must_cancel", "outcome", "pending", "pending_bytes", "proxy", "started", "stats",
        "trace_id", "trying", "up", "up_closed", "up_eof", "waiter",
    )

    def __init__(self, proxy: UpstreamProxy) -> None:
        self.proxy = proxy
        self.down: asyncio.Transport  # set by connection_made, before anything uses it
        self.up: asyncio.Transport | None = None
        self.endpoint: Endpoint | None = None
        #: The endpoint being connected, and its metrics (kept for the whole connection: ``prune`` keeps the
        #: series of endpoints with open connections, so they stay the registered ones).
        self.trying: Endpoint | None = None
        self.stats: EndpointMetrics | None = None
        #: Ids of endpoints whose connect failed, in order: also the ones ``pick`` must skip.
        self.failed: list[str] = []
        self.bytes_up = 0
        self.bytes_down = 0
        self.trace_id = ""
        self.started = 0.0
        self.outcome = ""
        self.down_eof = False
        self.up_eof = False
        self.down_closed = False
        self.up_closed = False
        self.finished = False
        self.client: str | None = None
        self.local: str | None = None
        #: The running ``loop.create_connection`` coroutine (stepped by ``_step``), the future it waits
        #: for, and whether it must be cancelled (timeout, or the client left) at its next step.
        self.connecting: Coroutine[Any, Any, tuple[asyncio.BaseTransport, asyncio.BaseProtocol]] | None = None
        self.waiter: asyncio.Future[Any] | None = None
        self.must_cancel = False
        #: What the client sent before an endpoint was connected (bounded: reading pauses past the limit).
        self.pending: list[bytes] = []
        self.pending_bytes = 0

    # -- the client's side (asyncio.Protocol) ---------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Reading is not paused while the endpoint is connected: what the client sends meanwhile
        # (usually its request) waits in ``pending``, bounded.  Pausing and resuming every connection
        # cost two epoll changes for nothing.
        self.down = down = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        proxy = self.proxy
        proxy.relays.add(self)
        if proxy.access_log is not None:  # only the access log needs these (getpeername is a syscall)
            self.trace_id = f"{_trace_ids.getrandbits(64):016x}"
            self.started = time.monotonic()
            self.client = _addr(down.get_extra_info("peername"))
        if not proxy.intentions(proxy.source, proxy.service):
            self._refuse("denied")
            return
        self._try_next()

    def data_received(self, data: bytes) -> None:
        self.bytes_up += len(data)
        if self.up is not None:
            self.up.write(data)
            return
        # Still connecting: hold it.
        self.pending.append(data)
        self.pending_bytes += len(data)
        if self.pending_bytes >= PENDING_BYTES_MAX:
            self.down.pause_reading()

    def eof_received(self) -> bool:
        self.down_eof = True
        up = self.up
        if up is not None and not up.is_closing():
            if self.up_eof:
                up.close()
                self.down.close()
            else:
                up.write_eof()
        return True  # keep the other direction open

    def connection_lost(self, exc: Exception | None) -> None:
        self.down_closed = True
        if self.connecting is not None:
            # The client left while we connect.  The attempt goes on to its end (connected, failed or timed
            # out) so that outlier detection still learns how the endpoint did, and then the relay finishes:
            # clients that give up sooner than the connect timeout must not hide a black-holed endpoint.
            self.outcome = "client_closed"
            return
        if exc is not None and self.outcome == "ok":
            self.outcome = "client_error"
        if self.up is not None and not self.up.is_closing():
            self.up.close()
        self._finish()

    def pause_writing(self) -> None:
        # The client reads slower than the endpoint sends: stop reading from the endpoint.
        if self.up is not None and not self.up.is_closing():
            self.up.pause_reading()

    def resume_writing(self) -> None:
        if self.up is not None and not self.up.is_closing():
            self.up.resume_reading()

    # -- connecting ----------------------------------------------------------------------------

    def _try_next(self) -> None:
        """Start connecting to the next endpoint, or reset the client when none is left."""
        proxy = self.proxy
        failed = self.failed
        endpoint = proxy.balancer.pick(failed) if len(failed) < proxy.attempts else None
        if endpoint is None:
            self._refuse("connect_failed" if failed else "no_endpoint")
            return
        self.trying = endpoint
        self.stats = proxy.stats(endpoint.id)
        self.connecting = proxy.loop.create_connection(self._upstream_protocol, endpoint.address, endpoint.port)
        proxy.watch_deadline(self)
        self._step()

    def _upstream_protocol(self) -> _Upstream:
        return _Upstream(self)

    def _step(self, _: object = None) -> None:
        """Run ``create_connection`` to its next wait, as a task would (without the task's costs).

        The coroutine only ever waits on futures; when one is done (the
        connect finished, or was cancelled) this is its done callback and
        resumes the coroutine.  Cancelling goes the way ``Task.cancel`` goes:
        cancel the future it waits for, or throw ``CancelledError`` in at its
        next step; ``create_connection`` then closes its half-made transport.
        """
        coro = self.connecting
        assert coro is not None
        self.waiter = None
        try:
            if self.must_cancel:
                self.must_cancel = False
                waiting = coro.throw(asyncio.CancelledError())
            else:
                waiting = coro.send(None)
        except StopIteration as done:
            self._attempt_ended()
            self._connected(done.value[0])
            return
        except (OSError, asyncio.CancelledError) as err:
            self._attempt_ended()
            if self.proxy.closing:  # cancelled by close(): not the endpoint's fault
                self._finish()
                return
            # Otherwise cancelled means timed out (the only other reason to cancel).
            self._connect_failed(TimeoutError() if isinstance(err, asyncio.CancelledError) else err)
            return
        except Exception:
            # A bug, not a network error: say so, and do not leave the client hanging.
            self._attempt_ended()
            log.exception("upstream %s: connecting to %s failed unexpectedly", self.proxy.service,
                          self.trying.id if self.trying is not None else "?")
            if self.down_closed:
                self._finish()
            else:
                self._refuse("connect_failed")
            return
        if waiting is None:  # a bare yield: run again at the next loop iteration (as a task does)
            self.proxy.loop.call_soon(self._step)
            return
        waiting._asyncio_future_blocking = False
        self.waiter = waiting
        waiting.add_done_callback(self._step)

    def _attempt_ended(self) -> None:
        self.connecting = None
        self.proxy.attempt_ended()

    def cancel_connect(self) -> None:
        """Stop the current connect attempt (it took too long, or the proxy closes)."""
        if self.connecting is None:
            return
        waiter = self.waiter
        if waiter is None or not waiter.cancel():
            self.must_cancel = True  # between steps (a step is scheduled): throw it in at the next one

    def _connect_failed(self, err: BaseException) -> None:
        proxy = self.proxy
        endpoint = self.trying
        assert endpoint is not None
        self.trying = None
        proxy.balancer.report(endpoint, False)
        if self.stats is not None:
            self.stats.failures.inc()
        self.stats = None
        self.failed.append(endpoint.id)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("upstream %s: connect to %s (%s) failed: %r; %s", proxy.service, endpoint.id,
                      endpoint.hostport, err, "rerouting" if len(self.failed) < proxy.attempts else "giving up")
        if self.down_closed:  # the client left meanwhile: no one to reroute for
            self._finish()
            return
        self._try_next()

    def _connected(self, transport: asyncio.Transport) -> None:
        proxy = self.proxy
        endpoint = self.trying
        assert endpoint is not None
        self.trying = None
        proxy.balancer.report(endpoint, True)
        if self.down_closed:  # the client left while we connected
            transport.close()
            self.outcome = "client_closed"
            self.up_closed = True
            self.stats = None
            self._finish()
            return
        self.up = transport
        self.endpoint = endpoint
        if proxy.access_log is not None:
            self.local = _addr(transport.get_extra_info("sockname"))
        proxy.balancer.started(endpoint)
        stats = self.stats
        if stats is not None:
            stats.connections.inc()
            stats.active.inc()
        self.outcome = "ok"
        if self.pending:
            data = b"".join(self.pending) if len(self.pending) > 1 else self.pending[0]
            paused = self.pending_bytes >= PENDING_BYTES_MAX
            self.pending.clear()
            self.pending_bytes = 0
            if paused and not self.down_eof and not self.down.is_closing():
                # Before the write: it may fill the endpoint's buffer and pause the client again.
                self.down.resume_reading()
            transport.write(data)
        if self.down_eof:
            transport.write_eof()

    def _refuse(self, outcome: str) -> None:
        self.outcome = outcome
        if self.proxy.metrics is not None:
            self.proxy.metrics.no_endpoint.labels(self.proxy.service, outcome).inc()
        # A reset, not a clean close: the client must not mistake it for an empty answer.
        self.down.abort()

    # -- events from the endpoint's side -------------------------------------------------------

    def up_data(self, data: bytes) -> None:
        self.bytes_down += len(data)
        self.down.write(data)

    def up_eof_received(self) -> None:
        self.up_eof = True
        down = self.down
        if not down.is_closing():
            if self.down_eof:
                down.close()
                if self.up is not None:
                    self.up.close()
            else:
                down.write_eof()

    def up_lost(self, exc: Exception | None) -> None:
        self.up_closed = True
        if exc is not None and self.outcome == "ok":
            self.outcome = "upstream_error"
        if not self.down.is_closing():
            self.down.close()
        self._finish()

    def pause_down_reading(self) -> None:
        if not self.down.is_closing():
            self.down.pause_reading()

    def resume_down_reading(self) -> None:
        if not self.down.is_closing():
            self.down.resume_reading()

    def _finish(self) -> None:
        if (self.finished or not self.down_closed or self.connecting is not None
                or (self.up is not None and not self.up_closed)):
            return
        self.finished = True
        proxy = self.proxy
        proxy.relays.discard(self)
        endpoint = self.endpoint
        if endpoint is not None:
            proxy.balancer.finished(endpoint)
            stats = self.stats
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
        self.loop: asyncio.AbstractEventLoop  # set by start()
        #: (deadline, relay, attempt) of connect attempts in flight, oldest first; see ``watch_deadline``.
        self._deadlines: deque[tuple[float, _Relay, int]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        #: Set by close(): connect attempts cancelled from now on are not the endpoints' failures.
        self.closing = False

    @property
    def listen(self) -> str:
        return f"{self.host}:{self.port}"

    def stats(self, endpoint_id: str) -> EndpointMetrics | None:
        return None if self.metrics is None else self.metrics.endpoint(self.service, endpoint_id)

    def watch_deadline(self, relay: _Relay) -> None:
        """Time out ``relay``'s connect attempt that starts now after ``connect_timeout_s``.

        One timer for the whole proxy rather than one per attempt (a timer
        handle, a libuv timer and its cancellation for every connection):
        every attempt gets the same timeout, so deadlines come in the order
        attempts start and a FIFO queue holds them sorted.  Entries of
        attempts that ended are dropped from the front as they end (attempts
        mostly end in the order they start) and otherwise when their deadline
        passes.
        """
        deadline = self.loop.time() + self.connect_timeout_s
        self._deadlines.append((deadline, relay, len(relay.failed)))
        if self._timer is None:
            self._timer = self.loop.call_at(deadline, self._expire)

    def attempt_ended(self) -> None:
        """Drop the entries of ended attempts from the front of the deadline queue (not to keep their relays)."""
        queue = self._deadlines
        while queue:
            _, relay, attempt = queue[0]
            if relay.connecting is not None and len(relay.failed) == attempt:
                return
            queue.popleft()

    def _expire(self) -> None:
        self._timer = None
        # Timers may fire up to a millisecond early (uvloop counts in ms): do not re-arm for a deadline
        # that is a hair away.
        now = self.loop.time() + 0.001
        queue = self._deadlines
        while queue:
            deadline, relay, attempt = queue[0]
            if deadline > now:
                self._timer = self.loop.call_at(deadline, self._expire)
                return
            queue.popleft()
            if relay.connecting is not None and len(relay.failed) == attempt:
                relay.cancel_connect()

    async def start(self) -> None:
        """Bind the listener; ConfigError if the address cannot be used (in use, not local, ...)."""
        self.loop = loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(lambda: _Relay(self), self.host, self.port,
                                                    reuse_address=True, backlog=LISTEN_BACKLOG)
        except OSError as err:
            raise ConfigError(f"upstream {self.service}: cannot listen on {self.listen}: {os_reason(err)}") from None
        if self.port == 0:
            self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._deadlines.clear()
        self.closing = True
        for relay in list(self.relays):
            relay.cancel_connect()  # if connecting; its end finishes the relay
            relay.down.abort()
            if relay.up is not None:
                relay.up.abort()
        if self._server is not None:
            await self._server.wait_closed()
