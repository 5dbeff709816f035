"""Shared watch fan-out: chunks encoded once, per-stream frame heads, direct delivery, client cancellation."""

from __future__ import annotations

import asyncio
from typing import Any

import msgpack
import pytest

from registry.client import Client
from registry.fsm.watch import Chunk, HubLimits, Selector, WatchHub, make_chunks
from registry.protocol import (
    Cancel,
    ClientConnection,
    Closed,
    FrameDecoder,
    Hello,
    HelloOk,
    NeedData,
    Request,
    ServerConnection,
    StreamEvent,
)
from registry.protocol.messages import REQUEST_ID_MAX, parse_server_message
from registry.protocol.shared import frame_shared_bodies, shared_frame_prefix, stream_event_head

Event = dict[str, Any]
WEB = Selector("service", "web")


def ev(revision: int, id_: str = "i1", payload: str = "") -> Event:
    return {"revision": revision, "type": "put", "kind": "instance", "service": "web", "id": id_,
            "before": None, "after": {"id": id_, "payload": payload}}


def revs(events: list[Event]) -> list[int]:
    return [e["revision"] for e in events]


# -- the wire: a shared body behind a per-stream head is an ordinary StreamEvent frame -----------


@pytest.mark.parametrize("request_id", [0, 1, 127, 128, 255, 256, 65_535, 65_536, 2**32, REQUEST_ID_MAX])
def test_a_shared_body_behind_a_stream_head_decodes_as_that_streams_event(request_id: int) -> None:
    body = {"type": "events", "events": [ev(3), ev(3, "i2")]}
    encoded = msgpack.packb(body, use_bin_type=True)
    head = stream_event_head(request_id)
    frame = shared_frame_prefix(head, len(encoded), 1 << 20) + encoded
    decoder = FrameDecoder()
    decoder.feed(frame)
    decoded = decoder.next_frame()
    assert decoded is not None and decoder.pending_bytes == 0
    message = parse_server_message(decoded)
    assert message == StreamEvent(request_id, body)
    # Byte for byte what the codec itself would send.
    server = ServerConnection()
    server.receive_data(ClientConnection().send(Hello(version=1, token=None, client="t")))
    server.next_event()
    server.send(HelloOk(version=1, node="n", revision=0))
    assert frame == server.send(StreamEvent(request_id, body))


def test_shared_frames_respect_the_frame_limit_and_refuse_bad_ids() -> None:
    head = stream_event_head(5)
    shared_frame_prefix(head, 100 - len(head), 100)
    with pytest.raises(Exception) as info:
        shared_frame_prefix(head, 101 - len(head), 100)
    assert getattr(info.value, "code", None) == "FRAME_TOO_LARGE"
    for bad in (-1, REQUEST_ID_MAX + 1, True):
        with pytest.raises(ValueError):
            stream_event_head(bad)


def test_framing_several_shared_bodies_gives_that_streams_events_in_order() -> None:
    bodies = [{"type": "events", "events": [ev(r)]} for r in (4, 5, 6)]
    encoded = [msgpack.packb(b, use_bin_type=True) for b in bodies]
    framed = frame_shared_bodies(stream_event_head(9), encoded, 1 << 20)
    assert framed is not None
    parts, size = framed
    wire = b"".join(parts)
    assert size == len(wire)
    decoder = FrameDecoder()
    decoder.feed(wire)
    got = []
    while (frame := decoder.next_frame()) is not None:
        got.append(parse_server_message(frame))
    assert got == [StreamEvent(9, b) for b in bodies]
    # One body past the frame limit: nothing is framed (the stream's task fails it instead).
    head = stream_event_head(9)
    assert frame_shared_bodies(head, [encoded[0], b"x" * (100 - len(head) + 1)], 100) is None
    assert frame_shared_bodies(head, [b"x" * (100 - len(head))], 100) is not None


# -- chunks ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 15, 16, 300, 65_535, 65_536])  # the array header's size classes
def test_a_chunk_body_is_the_events_item(count: int) -> None:
    events: list[Event] = [{"revision": 1 + i // 3} for i in range(count)]
    chunk = Chunk(events)
    assert msgpack.unpackb(chunk.body) == {"type": "events", "events": events}
    assert (chunk.first, chunk.last, chunk.count) == (1, 1 + (count - 1) // 3, count)
    piece = Chunk(events[:2], partial=True)  # a piece of a revision too big for one message
    assert msgpack.unpackb(piece.body) == {"type": "events", "events": events[:2], "partial": True}


def test_make_chunks_keeps_revisions_whole_and_splits_only_a_revision_too_big_alone() -> None:
    big = "x" * 1000
    events = [ev(1, payload=big), ev(2, "a", big), ev(2, "b", big), ev(3, payload=big)]
    one = len(msgpack.packb(events[0]))
    chunks = make_chunks(events, bytes_max=2 * one + 10)
    assert [revs(c.events) for c in chunks] == [[1], [2, 2], [3]]
    assert not any(c.partial for c in chunks)
    # Revision 2 alone is bigger than the budget: pieces, all but the last partial.
    chunks = make_chunks(events, bytes_max=one + 10)
    assert [(revs(c.events), c.partial) for c in chunks] == [([1], False), ([2], True), ([2], False), ([3], False)]
    assert [revs(c.events) for c in make_chunks(events)] == [[1, 2, 2, 3]]
    assert make_chunks([]) == []


# -- direct delivery ----------------------------------------------------------------------------------


class Direct:
    """A stand-in for ``StreamSink.try_send_encoded``."""

    def __init__(self) -> None:
        self.open = True
        self.sent: list[bytes] = []

    def __call__(self, bodies: list[bytes]) -> bool:
        if self.open:
            self.sent.extend(bodies)
        return self.open

    def revisions(self) -> list[int]:
        return [e["revision"] for body in self.sent for e in msgpack.unpackb(body)["events"]]


def test_a_watcher_that_keeps_up_gets_the_groups_shared_chunks_directly() -> None:
    hub = WatchHub(0)
    a = hub.subscribe(WEB, None, lambda: None)
    b = hub.subscribe(WEB, None, lambda: None)
    a_sent, b_sent = Direct(), Direct()
    a.direct, b.direct = a_sent, b_sent
    hub.publish(1, [ev(1)])
    assert a.pending == b.pending == 0 and a.next_revision == b.next_revision == 2
    # One encoding for the whole group: both got the very same bytes object.
    assert a_sent.sent[0] is b_sent.sent[0]
    assert hub.events_sent_direct == 2


def test_direct_delivery_never_overtakes_queued_events() -> None:
    hub = WatchHub(0)
    notes: list[int] = []
    watcher = hub.subscribe(WEB, None, lambda: notes.append(1))
    direct = Direct()
    watcher.direct = direct
    hub.publish(1, [ev(1)])
    direct.open = False  # the client's socket is full: queue
    hub.publish(2, [ev(2)])
    direct.open = True
    hub.publish(3, [ev(3)])  # something is queued: this queues too, in order
    assert direct.revisions() == [1]
    assert watcher.pending == 2 and notes
    assert revs([e for c in watcher.take_chunks() for e in c.events]) == [2, 3]
    hub.publish(4, [ev(4)])  # caught up again: direct
    assert direct.revisions() == [1, 4]
    assert watcher.next_revision == 5


def test_the_queue_is_bounded_in_bytes_too() -> None:
    payload = "p" * 1000
    size = len(Chunk([ev(1, payload=payload)]).body)
    hub = WatchHub(0, HubLimits(queue_bytes_max=3 * size))
    watcher = hub.subscribe(WEB, None, lambda: None)
    for rev in range(1, 4):
        hub.publish(rev, [ev(rev, payload=payload)])
    assert watcher.pending == 3 and watcher.resync_reason is None
    hub.publish(4, [ev(4, payload=payload)])
    assert watcher.resync_reason == "slow" and watcher.pending == 0 and watcher.pending_bytes == 0
    assert hub.resyncs == {"slow": 1}


def test_take_chunks_never_ends_inside_a_revision() -> None:
    hub = WatchHub(0)
    watcher = hub.subscribe(WEB, None, lambda: None)
    big = "x" * 2000
    hub.publish(1, [ev(1, f"i{i}", big) for i in range(600)])  # ~1.2 MB in one revision: pieces
    first = watcher.take_chunks(bytes_max=1)
    assert [c.partial for c in first][-1] is False and len(first) >= 3
    assert sum(c.count for c in first) == 600 and watcher.pending == 0


# -- the client: cancelling a watch always ends it (the bench hang) -------------------------------------


async def _flooding_server(events_per_stream: int) -> tuple[asyncio.Server, int]:
    """A minimal node: answers hello, then floods every watch with events until cancelled."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = ServerConnection()
        floods: dict[int, asyncio.Task[None]] = {}

        async def flood(req_id: int) -> None:
            writer.write(conn.send(StreamEvent(req_id, {"type": "created", "revision": 0})))
            for rev in range(1, events_per_stream + 1):
                writer.write(conn.send(StreamEvent(req_id, {"type": "events", "events": [ev(rev)]})))
                if rev % 4 == 0:
                    await asyncio.sleep(0)

        try:
            while True:
                data = await reader.read(65536)
                conn.receive_data(data)
                while True:
                    event = conn.next_event()
                    if isinstance(event, Hello):
                        writer.write(conn.send(HelloOk(version=event.version, node="fake", revision=0)))
                    elif isinstance(event, Request):
                        floods[event.id] = asyncio.get_running_loop().create_task(flood(event.id))
                    elif isinstance(event, Cancel) and event.id in floods:
                        floods.pop(event.id).cancel()
                    elif isinstance(event, NeedData | Closed):
                        break
                if not data:
                    break
        except (asyncio.CancelledError, ConnectionError):
            pass  # the test is over
        finally:
            for task in floods.values():
                task.cancel()
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_cancelling_busy_watches_always_ends_them() -> None:
    """Regression: ``Client.watch`` waited for each item with ``wait_for`` (Python 3.11), which
    swallows a cancellation landing just as an item arrives; the bench's watcher driver then
    waited forever for the watches it had cancelled."""

    async def run() -> list[int]:
        server, port = await _flooding_server(20_000)
        leftovers: list[int] = []
        try:
            async with Client([f"127.0.0.1:{port}"], timeout_s=5.0) as client:
                for _round in range(5):
                    got = [0] * 40

                    async def one(k: int, got: list[int]) -> None:
                        async for item in client.watch(service="web", progress_ms=1000):
                            if item["type"] == "events":
                                got[k] += 1

                    tasks = [asyncio.get_running_loop().create_task(one(k, got)) for k in range(40)]
                    while min(got) < 20:
                        await asyncio.sleep(0.005)
                    for task in tasks:
                        task.cancel()
                    _, pending = await asyncio.wait(tasks, timeout=5.0)
                    leftovers.append(len(pending))
                    if pending:
                        break  # the bug: these ignore cancellation; do not wait for them
        finally:
            server.close()
            # Let the closed transports (client and server side) finish closing before the loop
            # goes: a socket left to the garbage collector warns in whichever test runs next.
            await asyncio.sleep(0.2)
        return leftovers

    # A loop of our own, closed without waiting for tasks that ignored their cancellation
    # (asyncio.run would wait for them forever).
    loop = asyncio.new_event_loop()
    try:
        leftovers = loop.run_until_complete(asyncio.wait_for(run(), 60))
    finally:
        loop.close()
    assert leftovers == [0] * 5


# -- the client decodes a body repeated on several streams once ------------------------------------


def test_a_client_decodes_an_item_repeated_on_several_streams_once() -> None:
    server = ServerConnection()
    client = ClientConnection()
    server.receive_data(client.send(Hello(version=1, token=None, client="t")))
    server.next_event()
    client.receive_data(server.send(HelloOk(version=1, node="n", revision=0)))
    client.next_event()
    first = {"type": "events", "events": [ev(1)]}
    second = {"type": "events", "events": [ev(2)]}
    shared = msgpack.packb(first, use_bin_type=True)
    data = b"".join(shared_frame_prefix(stream_event_head(i), len(shared), 1 << 20) + shared
                    for i in (1, 300, 70_000))
    data += server.send(StreamEvent(4, second)) + server.send(StreamEvent(5, first))
    client.receive_data(data)
    got = [client.next_event() for _ in range(5)]
    assert [(e.id, e.body) for e in got if isinstance(e, StreamEvent)] == [
        (1, first), (300, first), (70_000, first), (4, second), (5, first)]
    bodies = [e.body for e in got if isinstance(e, StreamEvent)]
    assert bodies[0] is bodies[1] is bodies[2]  # decoded once
    assert bodies[4] is not bodies[0]  # a different body came in between: decoded again
    assert isinstance(client.next_event(), NeedData)


# -- the node merges applied batches that come faster than the linger --------------------------------


def test_batches_within_the_linger_go_out_as_one_fan_out_and_an_idle_node_sends_at_once() -> None:
    from registry.raft.node import StateHolder
    from registry.server.metrics import NodeMetrics
    from registry.server.watch_service import WatchService

    async def run() -> tuple[list[list[int]], list[list[int]]]:
        service = WatchService(WatchHub(0), StateHolder(), NodeMetrics())
        service.linger_s = 0.05
        watcher = service.hub.subscribe(WEB, None, lambda: None)
        seen = Direct()
        watcher.direct = seen
        service.publish(1, [ev(1)])  # idle: out at once
        at_once = [seen.revisions()]
        service.publish(2, [ev(2)])  # within the linger: held
        service.publish(3, [ev(3)])
        at_once.append(seen.revisions())
        await asyncio.sleep(0.1)
        merged = [[e["revision"] for e in msgpack.unpackb(body)["events"]] for body in seen.sent]
        return [at_once[0], at_once[1]], merged

    at_once, messages = asyncio.run(run())
    assert at_once == [[1], [1]]
    assert messages == [[1], [2, 3]]  # one message for both held batches
