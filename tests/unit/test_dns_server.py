"""The DNS shell (registry/server/dns/server.py) on real loopback sockets, in-process: its limits.

The whole node is tested in tests/integration/test_dns.py; here the shell's own bounds (TCP
connections at once, idle TCP connections, oversized TCP frames) are driven with small values.
"""

from __future__ import annotations

import asyncio
import random
import struct
from collections.abc import Awaitable, Callable

import dns.message
import dns.rcode
import uvloop

from registry.fsm.state import RegistryState
from registry.raft.node import StateHolder
from registry.server.dns.answer import Answerer
from registry.server.dns.server import DnsServer, StateCatalog
from registry.server.dns.settings import DnsSettings
from registry.server.dns.stats import DnsStats
from registry.server.ports import free_ports


def run(body: Callable[[DnsServer, int], Awaitable[None]], **settings: object) -> DnsStats:
    state = RegistryState()
    state.apply({"op": "register", "service": "web", "id": "w1", "address": "10.0.0.1", "port": 80})
    port = free_ports(1)[0]
    stats = DnsStats()
    server = DnsServer(DnsSettings(host="127.0.0.1", port=port, **settings),  # type: ignore[arg-type]
                       StateCatalog(StateHolder(state), None), stats, random.Random(1))

    async def main() -> None:
        await server.start()
        try:
            await body(server, port)
        finally:
            await server.stop()

    # The node's loop: uvloop, whose transports and Server.wait_closed differ from asyncio's.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
    return stats


def framed(name: str = "web.service.consul.") -> bytes:
    wire = dns.message.make_query(name, "A").to_wire()
    return struct.pack("!H", len(wire)) + wire


async def read_answer(reader: asyncio.StreamReader) -> dns.message.Message:
    (length,) = struct.unpack("!H", await reader.readexactly(2))
    return dns.message.from_wire(await reader.readexactly(length))


async def closed(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await writer.wait_closed()
    except ConnectionError:
        pass  # the server aborted it first


async def wait_for(cond: Callable[[], bool], deadline_s: float = 5.0) -> None:
    end = asyncio.get_running_loop().time() + deadline_s
    while not cond():
        assert asyncio.get_running_loop().time() < end, "condition not met in time"
        await asyncio.sleep(0.01)


def test_udp_and_tcp_answer_and_count() -> None:
    async def body(server: DnsServer, port: int) -> None:
        loop = asyncio.get_running_loop()
        got: asyncio.Future[bytes] = loop.create_future()

        class Client(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: object) -> None:
                got.set_result(data)

        transport, _ = await loop.create_datagram_endpoint(Client, remote_addr=("127.0.0.1", port))
        transport.sendto(dns.message.make_query("web.service.consul.", "A").to_wire())
        assert dns.message.from_wire(await asyncio.wait_for(got, 5)).answer[0][0].to_text() == "10.0.0.1"
        transport.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        # Two queries in one write, answered in order on one connection.
        writer.write(framed() + framed("nope.service.consul."))
        assert (await read_answer(reader)).answer[0][0].to_text() == "10.0.0.1"
        assert (await read_answer(reader)).rcode() == dns.rcode.NXDOMAIN
        await closed(writer)

    stats = run(body)
    assert stats.queries[("udp", "answer")] == 1
    assert stats.queries[("tcp", "answer")] == 1 and stats.queries[("tcp", "nxdomain")] == 1


def test_tcp_connections_beyond_the_limit_are_closed_at_accept() -> None:
    async def body(server: DnsServer, port: int) -> None:
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        await wait_for(lambda: server.stats.tcp_connections == 2)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(framed())
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, unanswered
        assert server.stats.tcp_refused == 1
        await closed(writer)
        # The ones held still work; once one goes, a new connection is served.
        held[0][1].write(framed())
        assert (await read_answer(held[0][0])).answer
        await closed(held[0][1])
        await wait_for(lambda: server.stats.tcp_connections == 1)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(framed())
        assert (await read_answer(reader)).answer
        for _, w in (held[1], (reader, writer)):
            await closed(w)

    run(body, tcp_connections_max=2)


def test_idle_tcp_connections_are_closed() -> None:
    async def body(server: DnsServer, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(framed())
        assert (await read_answer(reader)).answer
        start = asyncio.get_running_loop().time()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert asyncio.get_running_loop().time() - start >= 0.2
        await wait_for(lambda: server.stats.tcp_connections == 0)
        await closed(writer)

    run(body, tcp_idle_s=0.3)


def test_a_tcp_frame_longer_than_any_query_closes_the_connection() -> None:
    async def body(server: DnsServer, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(struct.pack("!H", 1025) + b"x" * 1025)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        await closed(writer)

    stats = run(body, query_bytes_max=1024)
    assert stats.malformed["oversized"] == 1


def test_stop_closes_open_tcp_connections() -> None:
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def body(server: DnsServer, port: int) -> None:
        held.append(await asyncio.open_connection("127.0.0.1", port))
        await wait_for(lambda: server.stats.tcp_connections == 1)
        await asyncio.wait_for(server.stop(), 2.0)  # not the 10 s idle timeout
        assert await asyncio.wait_for(held[0][0].read(), 2.0) == b""
        await closed(held[0][1])

    run(body)


def test_the_answer_caches_stay_within_cache_entries_max() -> None:
    state = RegistryState()
    for i in range(10):
        state.apply({"op": "register", "service": f"s{i}", "id": "x", "address": f"10.0.0.{i + 1}", "port": 80})
    catalog = StateCatalog(StateHolder(state), None)
    answerer = Answerer(DnsSettings(host="127.0.0.1", port=8600, cache_entries_max=3, record_cache_entries_max=4),
                        random.Random(1))
    for _ in range(2):
        for i in range(10):
            wire = dns.message.make_query(f"s{i}.service.consul.", "A").to_wire()
            data = answerer.answer(wire, catalog, tcp=False).data
            assert data is not None
            assert dns.message.from_wire(data).answer[0][0].to_text() == f"10.0.0.{i + 1}"
            assert len(answerer._cache) <= 3 and len(answerer._parsed) <= 3 and len(answerer._records) <= 4
