"""The DNS shell: UDP and TCP on the node's event loop, answering from its local state.

Each packet is answered inline in the protocol callback (``Answerer`` in
answer.py does all the work, with no I/O): no task per query, and the state
lock is held only to look up one service's records on a cache miss, so a
flood of queries costs the Raft thread nothing but its share of the GIL.
Answers are stale reads: the node's applied state, at whatever revision it
has reached (the SOA serial says which), never a read barrier.
"""

from __future__ import annotations

import asyncio
import logging
import random
import struct
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final, cast

from registry.config import format_hostport
from registry.errors import NotFound
from registry.fsm.acl import hash_secret
from registry.raft.node import StateHolder

from .answer import Answerer, Catalog
from .settings import DnsSettings
from .stats import DnsStats

__all__ = ["DnsServer", "StateCatalog"]

log = logging.getLogger("registry.dns")

_LENGTH: Final = struct.Struct("!H")


class StateCatalog:
    """``Catalog`` over the node's ``StateHolder``; with ``principal`` (a token hash) it enforces ACLs."""

    def __init__(self, holder: StateHolder, principal: str | None) -> None:
        self._holder = holder
        self._principal = principal

    def revision(self) -> int:
        # One attribute read of an int: atomic under the GIL, no lock needed.
        return self._holder.state.revision

    def instances(self, service: str) -> Sequence[Mapping[str, Any]] | None:
        with self._holder.lock:
            try:
                found = self._holder.state.get_service(service)
            except NotFound:
                return None
        records: list[Mapping[str, Any]] = found["instances"]
        return records

    def may_read(self, service: str) -> bool:
        if self._principal is None:
            return True
        now_ms = int(time.time() * 1000)
        with self._holder.lock:
            return self._holder.state.acl_may(self._principal, "read", "service:" + service, now_ms)


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self._server = server
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio's, only alike: cast, do not check.
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        reply = self._server.answer(data, "udp")
        if reply is not None and self._transport is not None:
            self._transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        # An ICMP "port unreachable" for an earlier reply: the client left; nothing to do.
        log.debug("dns udp error: %s", exc)


class _Tcp(asyncio.Protocol):
    """RFC 1035 4.2.2 / RFC 7766: queries framed by a 2-byte length, answered in order."""

    def __init__(self, server: DnsServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._idle: asyncio.TimerHandle | None = None
        #: Whether this connection is in stats.tcp_connections (not when refused at accept).
        self._counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        stats = self._server.stats
        if stats.tcp_connections >= self._server.settings.tcp_connections_max:
            stats.tcp_refused += 1
            transport.abort()
            self._transport = None
            return
        stats.tcp_connections += 1
        self._counted = True
        self._server.connections.add(self)
        self._arm()

    def _arm(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        loop = asyncio.get_running_loop()
        self._idle = loop.call_later(self._server.settings.tcp_idle_s, self._close)

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        if transport is None:
            return
        self._buffer += data
        while len(self._buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer)
            if length > self._server.settings.query_bytes_max or length == 0:
                # No DNS query is this big (or empty): the stream is not DNS; count it and hang up.
                self._server.stats.malformed["oversized"] += 1
                transport.close()
                self._transport = None
                return
            if len(self._buffer) < _LENGTH.size + length:
                break
            message = bytes(self._buffer[_LENGTH.size:_LENGTH.size + length])
            del self._buffer[: _LENGTH.size + length]
            reply = self._server.answer(message, "tcp")
            if reply is not None:
                transport.write(_LENGTH.pack(len(reply)) + reply)
            self._arm()

    def pause_writing(self) -> None:
        # A client that sends queries but does not read answers: stop reading until it does,
        # so its answers never pile up in our memory.
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None:
            self._transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._idle is not None:
            self._idle.cancel()
        if self._counted:
            self._server.stats.tcp_connections -= 1
            self._counted = False
        self._server.connections.discard(self)
        self._transport = None

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


class DnsServer:
    def __init__(self, settings: DnsSettings, catalog: Catalog, stats: DnsStats,
                 rng: random.Random | None = None) -> None:
        settings.validate()
        self.settings = settings
        self.stats = stats
        self._catalog = catalog
        self._answerer = Answerer(settings, rng if rng is not None else random.Random())
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.base_events.Server | None = None
        #: Open TCP connections, closed by ``stop`` (uvloop's wait_closed waits for every one).
        self.connections: set[_Tcp] = set()

    def answer(self, data: bytes, transport: str) -> bytes | None:
        reply = self._answerer.answer(data, self._catalog, tcp=transport == "tcp")
        self.stats.count(transport, reply)
        return reply.data

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = self.settings.host, self.settings.port
        udp, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), local_addr=(host, port))
        self._udp = udp
        self._tcp = await loop.create_server(lambda: _Tcp(self), host, port, reuse_address=True)
        log.info("dns serving udp+tcp %s for %s (stale reads: answers come from this node's applied state)",
                 format_hostport(host, port), self.settings.domain)

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            for connection in list(self.connections):
                connection.abort()
            await self._tcp.wait_closed()


def principal_of(token: str | None) -> str | None:
    """The token hash ACL checks use, from the secret in --dns-token-file."""
    return None if token is None else hash_secret(token)


async def start_dns(settings: DnsSettings | None, holder: StateHolder, stats: DnsStats, *,
                    acl: bool) -> DnsServer | None:
    """Start DNS as configured, or say why it stays off; with ACLs it reads with its token's rights only."""
    if settings is None:
        return None
    if acl and settings.token is None:
        log.warning("dns is off: ACLs are on and no --dns-token-file gives DNS a token to read services with")
        return None
    server = DnsServer(settings, StateCatalog(holder, principal_of(settings.token) if acl else None), stats)
    await server.start()
    return server
