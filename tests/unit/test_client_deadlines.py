"""The client's deadlines and silent-node probes, against a scripted node on a real socket.

The client keeps one watchdog timer per connection instead of one per request.
These tests pin what that timer must still do: end each request at its own
deadline (also one shorter than a request sent before it), leave slow requests
alone while the node talks, and make a node that went silent answer a probe.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest

from registry.client import Client, ConnectionFailed
from registry.errors import Timeout
from registry.protocol import (
    PROTOCOL_VERSION,
    Hello,
    HelloOk,
    NeedData,
    Request,
    Response,
    ServerConnection,
)


def _run(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    def run() -> None:
        asyncio.run(test())

    run.__name__ = test.__name__
    return run


class ScriptedNode:
    """A node that answers the handshake, then each request as ``answer(request)`` says.

    ``answer`` returns a body, or None to keep the request unanswered (the
    test may answer it later with ``reply``).  ``status`` probes are answered
    unless ``mute`` is set: a muted node is a stopped one with its TCP open.
    """

    def __init__(self, answer: Callable[[Request], Any]) -> None:
        self.answer = answer
        self.mute = False
        self.requests: list[Request] = []
        self.probes = 0
        self._writers: list[tuple[asyncio.StreamWriter, ServerConnection]] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"127.0.0.1:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = ServerConnection()
        self._writers.append((writer, conn))
        try:
            while data := await reader.read(65536):
                conn.receive_data(data)
                while not isinstance(event := conn.next_event(), NeedData):
                    if isinstance(event, Hello):
                        writer.write(conn.send(HelloOk(version=PROTOCOL_VERSION, node="scripted", revision=1)))
                    elif isinstance(event, Request):
                        self._handle(writer, conn, event)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    def _handle(self, writer: asyncio.StreamWriter, conn: ServerConnection, req: Request) -> None:
        if req.op == "status":
            self.probes += 1
            if not self.mute:
                writer.write(conn.send(Response(req.id, 1, body={"id": "scripted"})))
            return
        self.requests.append(req)
        body = None if self.mute else self.answer(req)
        if body is not None:
            writer.write(conn.send(Response(req.id, 1, body=body)))

    def reply(self, req: Request, body: Any) -> None:
        writer, conn = self._writers[-1]
        writer.write(conn.send(Response(req.id, 1, body=body)))

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer, _ in self._writers:
            writer.close()
        await self._server.wait_closed()


@contextlib.asynccontextmanager
async def scripted(answer: Callable[[Request], Any], **client_args: Any) -> AsyncIterator[tuple[ScriptedNode, Client]]:
    """A started ``ScriptedNode`` and a ``Client`` of it; both stopped on the way out."""
    node = ScriptedNode(answer)
    endpoint = await node.start()
    try:
        async with Client([endpoint], **client_args) as client:
            yield node, client
    finally:
        await node.stop()


async def _until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@_run
async def test_an_unanswered_write_has_an_unknown_outcome_a_read_timed_out() -> None:
    async with scripted(lambda req: None, timeout_s=5.0, probe_after_s=0.2) as (_, client):
        # A write that was sent may have applied; a read has no outcome to be unknown.
        with pytest.raises(Timeout, match=r"^register: no answer within the client timeout; outcome unknown$"):
            await client.call("register", {"name": "web"}, timeout_s=0.3, retry=False)
        with pytest.raises(Timeout, match=r"^service_get timed out: no answer within the client timeout$"):
            await client.call("service_get", {"name": "web"}, timeout_s=0.3, retry=False)


@_run
async def test_an_unanswered_request_ends_at_its_deadline() -> None:
    async with scripted(lambda req: None, timeout_s=5.0, probe_after_s=0.2) as (node, client):
        began = time.monotonic()
        with pytest.raises(Timeout, match="timed out"):
            await client.call("service_get", {"name": "web"}, timeout_s=0.5, retry=False)
        waited = time.monotonic() - began
        # Not before the deadline; the upper bound only says it did not wait for the 5 s default.
        assert 0.5 <= waited < 4.0
        # The node kept answering probes, so the client waited on it the whole time.
        assert node.probes >= 1


@_run
async def test_a_short_deadline_behind_a_long_one_still_fires_on_time() -> None:
    """The watchdog is armed for the first request's deadline; a later, shorter one must re-arm it."""
    async with scripted(lambda req: None, timeout_s=30.0, probe_after_s=10.0) as (node, client):
        slow = asyncio.ensure_future(client.call("get_service", {"name": "slow"}, timeout_s=20.0))
        await _until(lambda: len(node.requests) == 1)
        began = time.monotonic()
        with pytest.raises(Timeout):
            await client.call("get_service", {"name": "quick"}, timeout_s=0.3, retry=False)
        assert time.monotonic() - began < 5.0  # far below the 10 s probe interval and 20 s deadline
        assert not slow.done()
        # The timeout dropped the connection (the node may be wedged); the long call, which may
        # retry, sent its request again on a new one, and its answer there lands.
        await _until(lambda: [r.args["name"] for r in node.requests] == ["slow", "quick", "slow"])
        node.reply(node.requests[-1], {"name": "slow", "instances": []})
        _, body = await asyncio.wait_for(slow, 5.0)
        assert body == {"name": "slow", "instances": []}


@_run
async def test_a_slow_answer_from_a_talking_node_is_waited_for() -> None:
    """Past probe_after_s, a node that answers its probe keeps the request: the answer is still taken."""
    async with scripted(lambda req: None, timeout_s=10.0, probe_after_s=0.1) as (node, client):
        call = asyncio.ensure_future(client.call("get_service", {"name": "web"}, retry=False))
        await _until(lambda: node.probes >= 2)  # woken and probed twice: still waiting
        assert not call.done()
        node.reply(node.requests[0], {"name": "web", "instances": []})
        _, body = await asyncio.wait_for(call, 5.0)
        assert body["name"] == "web"


@_run
async def test_a_silent_node_is_left_well_before_the_deadline() -> None:
    """A node that answers nothing, probes included, fails the call early (the caller may go elsewhere)."""
    async with scripted(lambda req: None, timeout_s=30.0, probe_after_s=0.2, connect_timeout_s=0.25) as (node, client):
        await client.call("status", {})  # connected and heard from
        node.mute = True
        began = time.monotonic()
        with pytest.raises(Timeout):
            await client.call("get_service", {"name": "web"}, retry=False)
        assert time.monotonic() - began < 10.0  # the 30 s deadline was not spent on this node
        assert node.probes >= 2  # the connect-time status, then at least one unanswered probe


@_run
async def test_many_requests_in_flight_each_get_their_own_answer() -> None:
    async with scripted(lambda req: {"echo": req.args["n"]}, timeout_s=5.0) as (_, client):
        results = await asyncio.gather(*(client.call("echo", {"n": i}) for i in range(500)))
        assert [body["echo"] for _, body in results] == list(range(500))


@_run
async def test_a_write_sent_before_every_node_went_away_says_its_outcome_is_unknown() -> None:
    async with scripted(lambda req: None, timeout_s=30.0, probe_after_s=10.0) as (node, client):
        call = asyncio.ensure_future(client.call("register", {"name": "web"}))
        await _until(lambda: bool(node.requests))  # the write reached the node
        await node.stop()  # its connection breaks and its port refuses from now on
        began = time.monotonic()
        with pytest.raises(ConnectionFailed, match="no node listens there; the write was sent before the "
                                                   "connection broke: outcome unknown"):
            await call
        # Nothing listens: no waiting for the 30 s deadline (the bound only says it did not).
        assert time.monotonic() - began < 15.0
        # A read in the same situation has no outcome to be unknown.
        with pytest.raises(ConnectionFailed) as refused:
            await client.call("service_get", {"name": "web"})
        assert "outcome unknown" not in refused.value.message
