"""The node's request path in one process: server protocol, API, proposer and apply, no Raft.

A fake submitter stands in for pysyncobj: it applies each proposed batch with
the real ``RaftNode._apply_batch`` when the test says so, so the fast path
(no task per request, coalesced response writes, validate-once) is checked
against the same semantics as the task path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from registry.errors import BadRequest
from registry.protocol import (
    PROTOCOL_VERSION,
    Cancel,
    ClientConnection,
    Hello,
    HelloOk,
    NeedData,
    Request,
    Response,
    StreamEnd,
)
from registry.raft.node import Listener, StateHolder, apply_entry
from registry.server.api import NodeInfo, RegistryAPI, RevisionWaiters
from registry.server.metrics import NodeMetrics
from registry.server.proposer import Proposer
from registry.server.server import APIServer, _ClientProtocol


class _Raft:
    """Applies submitted batches with the real apply code, when ``commit()`` is called."""

    def __init__(self, holder: StateHolder, loop: asyncio.AbstractEventLoop) -> None:
        self._holder = holder
        self._listeners: list[Listener] = []
        self.loop = loop
        self.queued: list[tuple[bytes, Callable[[Any, int], None]]] = []

    def submit(self, batch: bytes, done: Callable[[Any, int], None]) -> None:
        self.queued.append((batch, done))

    def commit(self) -> None:
        queued, self.queued = self.queued, []
        for batch, done in queued:
            done(apply_entry(self._holder, batch, lambda: 1, self._listeners), 0)


class _Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def set_write_buffer_limits(self, high: int) -> None:
        pass

    def get_extra_info(self, key: str) -> Any:
        return ("127.0.0.1", 1)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


class _Node:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.holder = StateHolder()
        self.raft = _Raft(self.holder, loop)
        metrics = NodeMetrics()
        waiters = RevisionWaiters(loop)
        self.raft._listeners.append(lambda revision, events, entry_bytes: waiters.applied(revision))
        self.proposer = Proposer(self.raft, loop, metrics, batch_commands_max=64, batch_bytes_max=1 << 20,
                                 batch_inflight_max=2, pending_max=1000, timeout_s=5.0)
        info = NodeInfo("n1", "127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3", {})
        self.api = RegistryAPI(info, self.holder, self.raft, self.proposer, waiters, 5.0)  # type: ignore[arg-type]
        self.server = APIServer(self.api, metrics, frame_bytes_max=1 << 20, connections_max=10)
        self.server.known_ops.update(self.api.ops)
        self.transport = _Transport()
        self.proto = _ClientProtocol(self.server)
        self.proto.connection_made(self.transport)  # type: ignore[arg-type]
        self.client = ClientConnection()
        self.proto.data_received(self.client.send(Hello(version=PROTOCOL_VERSION, token=None, client="t")))

    def send(self, *events: Request | Cancel) -> None:
        self.proto.data_received(b"".join(self.client.send(e) for e in events))

    def received(self) -> list[Any]:
        out: list[Any] = []
        for data in self.transport.writes:
            self.client.receive_data(data)
        self.transport.writes.clear()
        while not isinstance(event := self.client.next_event(), NeedData):
            if not isinstance(event, HelloOk):
                out.append(event)
        return out


def _run(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """Run an async test in a fresh event loop (the suite has no asyncio plugin)."""

    def run() -> None:
        asyncio.run(test())

    run.__name__ = test.__name__
    return run


async def _turn(passes: int = 3) -> None:
    for _ in range(passes):
        await asyncio.sleep(0)


REG = {"service": "web", "id": "a", "address": "10.0.0.1", "port": 80, "meta": {"b": "1", "a": "2"}, "rid": "r1"}


@_run
async def test_write_and_reads_on_the_fast_path() -> None:
    node = _Node(asyncio.get_running_loop())
    node.send(Request(1, "register", REG))
    await _turn()
    assert node.received() == []  # waiting for commit, not answered early
    node.raft.commit()
    await _turn()
    (response,) = node.received()
    assert isinstance(response, Response) and response.error is None
    assert response.body == {"revision": 1, "created": True} and response.revision == 1
    # The same rid again: the state machine's dedup answers with the first outcome.
    node.send(Request(2, "register", REG), Request(3, "service_get", {"name": "web"}),
              Request(4, "service_get", {"name": "web", "consistency": "stale"}))
    await _turn()
    stale = node.received()
    assert [r.id for r in stale] == [4]  # stale reads answer at once; the others wait for a commit
    node.raft.commit()
    await _turn()
    by_id = {r.id: r for r in node.received()}
    assert by_id[2].body == {"revision": 1, "created": True}
    assert by_id[3].body["instances"][0]["meta"] == {"a": "2", "b": "1"}  # validated once, normalised
    assert by_id[3].body == stale[0].body
    # The task path (api.handle) gives the same answers.
    task_answer = asyncio.ensure_future(node.api.handle("service_get", {"name": "web"}))
    await _turn()
    node.raft.commit()
    assert await task_answer == (by_id[3].revision, by_id[3].body)


@_run
async def test_errors_on_the_fast_path() -> None:
    node = _Node(asyncio.get_running_loop())
    node.send(
        Request(1, "register", {**REG, "port": "80"}),
        Request(2, "register", {**REG, "service": "bad name"}),
        Request(3, "register", {**REG, "now_ms": 5}),
        Request(4, "service_get", {"name": "web", "bogus": 1}),
        Request(5, "service_get", {"name": "web", "consistency": "stale"}),
    )
    await _turn()
    codes = {r.id: r.error.code for r in node.received()}
    assert codes == {1: "BAD_REQUEST", 2: "INVALID_NAME", 3: "BAD_REQUEST", 4: "BAD_REQUEST", 5: "NOT_FOUND"}
    assert node.raft.queued == []  # nothing invalid was proposed


@_run
async def test_responses_of_one_pass_share_one_write() -> None:
    node = _Node(asyncio.get_running_loop())
    node.send(*(Request(i, "register", {**REG, "id": f"i{i}", "rid": f"r{i}"}) for i in range(1, 41)))
    await _turn()
    assert node.received() == []  # (only the hello_ok so far)
    node.raft.commit()
    await _turn()
    assert len(node.transport.writes) == 1
    assert sorted(r.id for r in node.received()) == list(range(1, 41))


@_run
async def test_cancel_and_close_withdraw_fast_path_requests() -> None:
    node = _Node(asyncio.get_running_loop())
    node.send(Request(1, "register", REG), Request(2, "service_list", {}))
    await _turn()
    node.send(Cancel(1))
    await _turn()
    node.raft.commit()
    await _turn()
    events = node.received()
    # Its batch was already proposed (it applies), but the cancelled request gets no answer, as a
    # cancelled task would not.
    assert [(type(e), e.id) for e in events] == [(StreamEnd, 1), (Response, 2)]
    node.send(Request(3, "register", {**REG, "rid": "r3"}))
    await _turn()
    node.proto.connection_lost(None)
    node.raft.commit()
    await _turn()
    assert node.received() == []


@_run
async def test_proposer_validates_what_it_is_given() -> None:
    node = _Node(asyncio.get_running_loop())
    with pytest.raises(BadRequest):
        await node.proposer.write({"op": "leader_epoch", "epoch": "x"})
    # An internal command without its optional fields is normalised before it enters the log,
    # so every replica applies it through the structural guard only.
    pending = asyncio.ensure_future(node.proposer.write({"op": "leader_epoch", "epoch": 3}))
    await _turn()
    node.raft.commit()
    assert (await pending)["revision"] == 0
    assert node.holder.state.epoch == 3


@_run
async def test_read_your_writes_waits_on_the_fast_path() -> None:
    """A read asking for a revision this node has not applied yet waits for it (in a task), then answers."""
    node = _Node(asyncio.get_running_loop())
    node.send(Request(1, "service_list", {"consistency": "stale", "min_revision": 1}),
              Request(2, "register", REG))
    await _turn()
    assert node.received() == []
    node.raft.commit()
    await _turn(6)
    by_id = {r.id: r for r in node.received()}
    assert by_id[2].revision == 1
    assert by_id[1].error is None and by_id[1].revision == 1 and [s["name"] for s in by_id[1].body] == ["web"]
