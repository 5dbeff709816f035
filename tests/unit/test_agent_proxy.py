"""The proxy, checks and resolver over real loopback sockets, in one process (no registry)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from registry.agent.balancer import Balancer
from registry.agent.checks import CheckLoop, run_check
from registry.agent.echo import EchoProtocol
from registry.agent.endpoint import Endpoint
from registry.agent.errors import ConfigError, NoEndpoint
from registry.agent.health import parse_check
from registry.agent.metrics import AgentMetrics
from registry.agent.outlier import OutlierConfig
from registry.agent.policies import RoundRobin
from registry.agent.proxy import AccessLog, UpstreamProxy
from registry.agent.resolver import Resolver

OUTLIER = OutlierConfig(consecutive_failures=2, base_ejection_s=30.0, max_ejection_s=60.0)


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 20))  # type: ignore[arg-type]


async def until(cond: Callable[[], bool], what: str, deadline_s: float = 10.0) -> None:
    """Wait on the loop until ``cond()`` holds; fail naming ``what`` after ``deadline_s``."""
    end = time.monotonic() + deadline_s
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def dead_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def echo_server(name: str) -> tuple[asyncio.Server, int]:
    server = await asyncio.get_running_loop().create_server(lambda: EchoProtocol(name), "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


class Harness:
    def __init__(self, endpoints: list[Endpoint], **kwargs: Any) -> None:
        self.log_stream = io.StringIO()
        self.access_log = AccessLog(stream=self.log_stream)
        self.metrics = AgentMetrics()
        self.balancer = Balancer("echo", RoundRobin(), OUTLIER, time.monotonic)
        self.balancer.update(endpoints)
        self.proxy = UpstreamProxy("echo", "127.0.0.1", 0, self.balancer, source="tester", metrics=self.metrics,
                                   access_log=self.access_log, connect_timeout_s=0.5, **kwargs)

    async def ask(self, text: str = "hi") -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.proxy.port)
        writer.write(text.encode() + b"\n")
        line = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        return line

    async def settle(self) -> list[dict[str, Any]]:
        """Wait until every relay finished; the access-log records so far."""
        for _ in range(200):
            if not self.proxy.relays:
                break
            await asyncio.sleep(0.01)
        return [json.loads(line) for line in self.log_stream.getvalue().splitlines()]


def test_relay_and_access_log() -> None:
    async def main() -> None:
        server, port = await echo_server("e1")
        h = Harness([Endpoint("echo", "e1", "127.0.0.1", port)])
        await h.proxy.start()
        assert await h.ask("hello") == b"e1 hello\n"
        (rec,) = await h.settle()
        assert rec["outcome"] == "ok" and rec["endpoint"] == "e1" and rec["address"] == f"127.0.0.1:{port}"
        assert (rec["bytes_up"], rec["bytes_down"], rec["source"], rec["upstream"]) == (6, 9, "tester", "echo")
        assert len(rec["trace_id"]) == 16 and rec["failed"] == [] and rec["local"].startswith("127.0.0.1:")
        stats = h.metrics.endpoint("echo", "e1")
        assert stats.connections._value.get() == 1 and stats.bytes_received._value.get() == 9
        await h.proxy.close()
        server.close()

    run(main())


def test_connect_failure_reroutes_within_the_connection_then_ejects() -> None:
    async def main() -> None:
        server, port = await echo_server("live")
        dead = Endpoint("echo", "a-dead", "127.0.0.1", dead_port())
        h = Harness([dead, Endpoint("echo", "b-live", "127.0.0.1", port)])
        await h.proxy.start()
        answers = [await h.ask(str(i)) for i in range(6)]
        assert all(a.startswith(b"live ") for a in answers)  # no client saw the dead endpoint
        records = await h.settle()
        assert [r["failed"] for r in records[:2]] == [["a-dead"], ["a-dead"]]
        assert all(r["failed"] == [] for r in records[2:])  # ejected after 2 failures: never tried again
        assert h.balancer.outlier.is_ejected("a-dead", time.monotonic())
        assert h.metrics.endpoint("echo", "a-dead").failures._value.get() == 2
        await h.proxy.close()
        server.close()

    run(main())


@pytest.mark.parametrize(("endpoints", "outcome"), [(0, "no_endpoint"), (2, "connect_failed")])
def test_nowhere_to_go_resets_the_client(endpoints: int, outcome: str) -> None:
    async def main() -> None:
        h = Harness([Endpoint("echo", f"d{i}", "127.0.0.1", dead_port()) for i in range(endpoints)])
        await h.proxy.start()
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            line = await h.ask()
            if not line:
                raise ConnectionError("closed without an answer")
        (rec,) = await h.settle()
        assert rec["outcome"] == outcome and rec["endpoint"] is None and len(rec["failed"]) == endpoints
        await h.proxy.close()

    run(main())


def test_intentions_hook_can_deny() -> None:
    async def main() -> None:
        server, port = await echo_server("e1")
        seen: list[tuple[str, str]] = []

        def deny(source: str, destination: str) -> bool:
            seen.append((source, destination))
            return False

        h = Harness([Endpoint("echo", "e1", "127.0.0.1", port)], intentions=deny)
        await h.proxy.start()
        with pytest.raises((ConnectionError, AssertionError)):
            assert await h.ask()
        (rec,) = await h.settle()
        assert rec["outcome"] == "denied" and seen == [("tester", "echo")]
        await h.proxy.close()
        server.close()

    run(main())


def hanging_listener() -> tuple[socket.socket, list[socket.socket]]:
    """A listener whose accept queue is full (and what fills it): the kernel drops further SYNs, so a connect hangs."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(0)
    fillers = []
    for _ in range(8):  # the queue holds backlog + 1; a few more, whatever this kernel's rounding
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(sock.getsockname())
        fillers.append(filler)
    return sock, fillers


def test_connect_timeout_reroutes_then_client_leaving_cancels_the_connect(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="registry.agent.proxy")

    def timeouts() -> int:
        """Connect attempts to the hanging endpoint that ended by the proxy's timeout (it never answers)."""
        return sum("connect to a-hang" in r.getMessage() and "TimeoutError" in r.getMessage() for r in caplog.records)

    async def main() -> None:
        server, port = await echo_server("live")
        hang, fillers = hanging_listener()
        hang_port = hang.getsockname()[1]
        h = Harness([Endpoint("echo", "a-hang", "127.0.0.1", hang_port), Endpoint("echo", "b-live", "127.0.0.1", port)])
        await h.proxy.start()
        assert await h.ask("x") == b"live x\n"
        assert timeouts() == 1  # one connect timeout, then the live endpoint
        (rec,) = await h.settle()
        assert rec["outcome"] == "ok" and rec["failed"] == ["a-hang"] and rec["endpoint"] == "b-live"
        assert h.metrics.endpoint("echo", "a-hang").failures._value.get() == 1

        # Only the hanging endpoint left, and the client gives up first: the attempt still runs to its
        # timeout and counts (a black-holed endpoint must be ejected even if clients are impatient).
        h.balancer.update([Endpoint("echo", "a-hang", "127.0.0.1", hang_port)])
        _, writer = await asyncio.open_connection("127.0.0.1", h.proxy.port)
        writer.write(b"x\n")
        await until(lambda: any(r.connecting is not None for r in h.proxy.relays), "the proxy to start connecting")
        # A reset (a plain close is a half-close, which the proxy passes on once connected).
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        await until(lambda: not h.proxy.relays, "the abandoned attempt to end")
        records = await h.settle()
        # "client_closed": the client left while the proxy was connecting; the attempt still ran to its
        # timeout and counted against the endpoint.
        assert records[-1]["outcome"] == "client_closed" and records[-1]["failed"] == ["a-hang"]
        assert timeouts() == 2
        assert h.metrics.endpoint("echo", "a-hang").failures._value.get() == 2
        assert h.balancer.outlier.is_ejected("a-hang", time.monotonic())
        assert not h.proxy._deadlines and h.proxy._timer is None
        await h.proxy.close()
        server.close()
        for filler in fillers:
            filler.close()
        hang.close()

    run(main())


def test_many_concurrent_connections_all_relayed() -> None:
    """Connects complete out of order and interleave with data: every client gets its own answer."""

    async def main() -> None:
        server, port = await echo_server("e1")
        h = Harness([Endpoint("echo", "e1", "127.0.0.1", port)])
        await h.proxy.start()
        # 90: within the echo server's listen backlog (100), or its kernel drops SYNs and connects time out.
        answers = await asyncio.gather(*(h.ask(str(i)) for i in range(90)))
        assert answers == [f"e1 {i}\n".encode() for i in range(90)]
        records = await h.settle()
        assert len(records) == 90 and all(r["outcome"] == "ok" for r in records)
        assert h.balancer.active == {"e1": 0} and not h.proxy._deadlines
        await h.proxy.close()
        server.close()

    run(main())


def test_half_close_and_bulk_both_ways() -> None:
    async def main() -> None:
        server, port = await echo_server("e1")
        h = Harness([Endpoint("echo", "e1", "127.0.0.1", port)])
        await h.proxy.start()
        # Upload 8 MiB, half-close, and the answer still comes back.
        reader, writer = await asyncio.open_connection("127.0.0.1", h.proxy.port)
        writer.write(b"SINK\n")
        chunk = b"y" * 65536
        for _ in range(128):
            writer.write(chunk)
            await writer.drain()
        writer.write_eof()
        assert await asyncio.wait_for(reader.readline(), 10) == b"e1 8388608\n"
        writer.close()
        # Download 32 MiB (the proxy must pause and resume reading as the client drains).
        reader, writer = await asyncio.open_connection("127.0.0.1", h.proxy.port)
        writer.write(b"SOURCE 33554432\n")
        total = 0
        while data := await reader.read(1 << 16):
            total += len(data)
        writer.close()
        assert total == 32 << 20
        records = await h.settle()
        assert [r["bytes_down"] for r in records] == [len(b"e1 8388608\n"), 32 << 20]
        await h.proxy.close()
        server.close()

    run(main())


def test_port_in_use_is_a_config_error() -> None:
    async def main() -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            h = Harness([])
            h.proxy.port = sock.getsockname()[1]
            with pytest.raises(ConfigError, match=r"cannot listen on 127\.0\.0\.1:.*in use"):
                await h.proxy.start()

    run(main())


# -- checks ----------------------------------------------------------------------------------


def test_checks() -> None:
    async def main() -> None:
        server, port = await echo_server("e1")
        healthy = [True]

        async def health(request: web.Request) -> web.Response:
            return web.Response(status=200 if healthy[0] else 503)

        app = web.Application()
        app.router.add_get("/health", health)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        http_port = runner.addresses[0][1]
        py = sys.executable
        table: list[tuple[str, bool, str]] = [
            (f"tcp:127.0.0.1:{port}", True, "ok"),
            (f"tcp:127.0.0.1:{dead_port()}", False, "ConnectionRefused"),
            (f"http:http://127.0.0.1:{http_port}/health", True, "200"),
            (f"http:http://127.0.0.1:{dead_port()}/health", False, "ClientConnectorError"),
            (f"cmd:{py} -c 'print(42)'", True, "exit 0: 42"),
            (f"cmd:{py} -c 'import sys; sys.exit(3)'", False, "exit 3"),
            (f"cmd:{py} -c 'import time; time.sleep(5)'", False, "timed out"),
            ("cmd:/nonexistent/check", False, "FileNotFoundError"),
        ]
        for text, ok, note in table:
            result = await run_check(parse_check(text, interval_s=2.0, timeout_s=1.0))
            assert result[0] is ok and note in result[1], (text, result)
        healthy[0] = False
        ok, note = await run_check(parse_check(f"http:http://127.0.0.1:{http_port}/health"))
        assert not ok and "503" in note

        changes: list[str] = []

        async def on_change(status: str, note: str) -> None:
            changes.append(status)

        loop = CheckLoop(parse_check(f"http:http://127.0.0.1:{http_port}/health", interval_s=0.05, timeout_s=0.05,
                                     rise=2, fall=2), on_change)
        assert await loop.check_once() == "critical"
        healthy[0] = True
        assert [await loop.check_once() for _ in range(2)] == [None, "passing"]
        assert changes == ["critical", "passing"]
        await runner.cleanup()
        server.close()

    run(main())


# -- resolver over a fake client ---------------------------------------------------------------


class FakeClient:
    """Only what Resolver uses: ``watch``, fed from a queue."""

    def __init__(self) -> None:
        self.items: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def watch(self, **kwargs: Any) -> AsyncIterator[dict[str, Any]]:
        while True:
            yield await self.items.get()


def _inst(i: str, status: str = "passing") -> dict[str, Any]:
    return {"service": "api", "id": i, "address": "127.0.0.1", "port": 1, "weight": 1, "status": status}


def test_resolver() -> None:
    async def main() -> None:
        client = FakeClient()
        resolver = Resolver(client, policy="round_robin", outlier=OUTLIER, list_timeout_s=0.2)  # type: ignore[arg-type]
        with pytest.raises(NoEndpoint, match="no listing"):
            await resolver.resolve("api")
        await client.items.put({"type": "snapshot", "reason": "list", "revision": 3,
                                "services": [{"service": {"name": "api"}, "instances": [_inst("a"), _inst("b")]}]})
        await asyncio.sleep(0.01)
        picked = []
        for _ in range(4):
            ep = await resolver.resolve("api")
            picked.append(ep.id)
            resolver.report(ep, ok=ep.id != "a")
        assert picked == ["a", "b", "a", "b"]
        # a failed twice: ejected; rerouting with exclude finds nothing else but b.
        assert [(await resolver.resolve("api")).id for _ in range(3)] == ["b", "b", "b"]
        with pytest.raises(NoEndpoint, match="no endpoint available"):
            await resolver.resolve("api", exclude={"b"})
        balancer = resolver.balancer("api")
        assert balancer is not None and balancer.active == {"a": 0, "b": 3}
        await client.items.put({"type": "events", "events": [
            {"revision": 4, "type": "status", "kind": "instance", "service": "api", "id": "b", "before": None,
             "after": _inst("b", "critical")}]})
        await asyncio.sleep(0.01)
        assert balancer.panic  # 0 of 2 healthy
        await resolver.close()

    run(main())

