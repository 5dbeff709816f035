"""Tests of the sans-IO wire protocol: framing, messages, connection state machines."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from registry import errors
from registry.errors import (
    BadRequest,
    FrameTooLarge,
    Internal,
    InvalidArgument,
    LimitExceeded,
    NotFound,
    ProtocolError,
    RegistryError,
    Timeout,
    VersionMismatch,
)
from registry.fsm.ops import WRITE_OPS
from registry.protocol import (
    CLIENT_NAME_CHARS_MAX,
    CLOSED,
    FRAME_BYTES_MAX_DEFAULT,
    NEED_DATA,
    NESTING_DEPTH_MAX,
    OP_NAME_CHARS_MAX,
    PROTOCOL_VERSION,
    REQUEST_ID_MAX,
    STREAMS_PER_CONNECTION_MAX,
    TOKEN_CHARS_MAX,
    BadMessage,
    Bye,
    Cancel,
    ClientConnection,
    Closed,
    FrameDecoder,
    Hello,
    HelloOk,
    NeedData,
    Request,
    Response,
    ServerConnection,
    StreamEnd,
    StreamEvent,
    encode_frame,
)

FUZZ = settings(deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow])

# -- helpers ---------------------------------------------------------------------


def raw_frame(body: bytes) -> bytes:
    """A frame around arbitrary body bytes, bypassing every check."""
    return struct.pack(">I", len(body)) + body


def frame(obj: Any) -> bytes:
    return raw_frame(msgpack.packb(obj, use_bin_type=True))


def nested(depth: int, *, empty: bool = False) -> dict[str, Any]:
    """A frame map whose containers nest exactly ``depth`` deep (the map counts)."""
    inner: Any = [] if empty else 0
    for _ in range(depth - 1 - empty):
        inner = [inner]
    return {"t": "x", "v": inner} if depth > 1 else {"t": "x"}


def sized(body_bytes: int) -> dict[str, Any]:
    """A map that packs to exactly ``body_bytes`` bytes."""
    for pad in range(body_bytes, -1, -1):
        obj = {"p": "x" * pad}
        if len(msgpack.packb(obj)) == body_bytes:
            return obj
    raise AssertionError(body_bytes)


def drain(conn: ServerConnection | ClientConnection) -> list[Any]:
    out: list[Any] = []
    while True:
        event = conn.next_event()
        if isinstance(event, NeedData | Closed):
            return out
        out.append(event)


def feed(conn: ServerConnection | ClientConnection, data: bytes, chunk: int) -> list[Any]:
    out: list[Any] = []
    for i in range(0, len(data), chunk):
        conn.receive_data(data[i : i + chunk])
        out.extend(drain(conn))
    return out


def server_after_hello(checked_ops: frozenset[str] = frozenset()) -> ServerConnection:
    server = ServerConnection(checked_ops=checked_ops)
    server.receive_data(frame({"t": "hello", "v": PROTOCOL_VERSION, "token": None, "client": "t"}))
    assert isinstance(server.next_event(), Hello)
    server.send(HelloOk(PROTOCOL_VERSION, "n1", 0))
    return server


def client_after_hello() -> ClientConnection:
    client = ClientConnection()
    client.send(Hello(PROTOCOL_VERSION, None, "t"))
    client.receive_data(frame({"t": "hello_ok", "v": PROTOCOL_VERSION, "node": "n1", "rev": 0}))
    assert isinstance(client.next_event(), HelloOk)
    return client


def wire(event: Any) -> Any:
    return (type(event).__name__, event.to_wire()) if hasattr(event, "to_wire") else event


# -- framing -------------------------------------------------------------------

BAD_BODIES = [
    pytest.param(b"\xc1", id="reserved-byte"),
    pytest.param(b"\xc0", id="nil-not-map"),
    pytest.param(msgpack.packb([1, 2]), id="array-not-map"),
    pytest.param(msgpack.packb({1: "x"}), id="int-key"),
    pytest.param(msgpack.packb({b"k": 1}, use_bin_type=True), id="bytes-key"),
    pytest.param(msgpack.packb({"a": {2: 1}}), id="nested-int-key"),
    pytest.param(msgpack.packb({"a": 1}) + b"\x00", id="trailing-bytes"),
    pytest.param(b"\x81\xa1a", id="truncated-map"),
    pytest.param(b"\x81\xa1a\xa1\xff", id="bad-utf8"),
    pytest.param(msgpack.packb({"a": msgpack.ExtType(5, b"x")}), id="ext-type"),
    pytest.param(msgpack.packb({"a": msgpack.Timestamp(1, 0)}), id="timestamp"),
    pytest.param(b"\x81\xa1a\xdd\xff\xff\xff\xff", id="array-claims-4G-items"),
    pytest.param(b"\xdf\xff\xff\xff\xff", id="map-claims-4G-items"),
    pytest.param(b"\x81\xa1a\xdb\xff\xff\xff\xff", id="str-claims-4GiB"),
    pytest.param(msgpack.packb(nested(NESTING_DEPTH_MAX + 1)), id="nesting-max+1"),
    pytest.param(msgpack.packb(nested(NESTING_DEPTH_MAX + 1, empty=True)), id="empty-at-nesting-max+1"),
    pytest.param(b"\x81\xa1a" + b"\x91" * 5000 + b"\x00", id="nesting-beyond-msgpack-stack"),
]


@pytest.mark.parametrize("body", BAD_BODIES)
def test_bad_body_is_protocol_error_and_sticky(body: bytes) -> None:
    decoder = FrameDecoder()
    decoder.feed(raw_frame(body) + frame({"t": "x"}))
    with pytest.raises(ProtocolError) as first:
        decoder.next_frame()
    assert type(first.value) is ProtocolError
    for _ in range(3):  # dead: the same error every time, later bytes dropped
        decoder.feed(frame({"t": "x"}))
        with pytest.raises(ProtocolError) as again:
            decoder.next_frame()
        assert again.value is first.value
    assert decoder.pending_bytes == 0
    assert decoder.error is first.value


#: Refused only by the data-model walk, which a client's decoder skips (it trusts its node).
MODEL_ONLY = {"bytes-key", "nesting-max+1", "empty-at-nesting-max+1"}


@pytest.mark.parametrize("body", [p for p in BAD_BODIES if p.id not in MODEL_ONLY])
def test_trusting_decoder_still_refuses_what_msgpack_refuses(body: bytes) -> None:
    decoder = FrameDecoder(check_model=False)
    decoder.feed(raw_frame(body))
    with pytest.raises(ProtocolError):
        decoder.next_frame()


@pytest.mark.parametrize("body", [p for p in BAD_BODIES if p.id in MODEL_ONLY])
def test_only_the_trusting_decoder_accepts_frames_outside_the_data_model(body: bytes) -> None:
    trusting = FrameDecoder(check_model=False)
    trusting.feed(raw_frame(body))
    assert isinstance(trusting.next_frame(), dict)
    checking = FrameDecoder()
    checking.feed(raw_frame(body))
    with pytest.raises(ProtocolError):
        checking.next_frame()


#: Args outside the data model in each way only the walk refuses (the decoder refuses int keys itself).
OFF_MODEL_ARGS = [
    pytest.param({"meta": {b"k": "v"}}, id="bytes-key"),
    pytest.param(nested(NESTING_DEPTH_MAX), id="too-deep-inside-a-frame"),
]


@pytest.mark.parametrize("args", OFF_MODEL_ARGS)
def test_server_leaves_only_a_checked_ops_args_unwalked(args: dict[Any, Any]) -> None:
    """A write's args reach the node's field-by-field check as they are; the rest is walked."""
    server = server_after_hello(checked_ops=WRITE_OPS)
    server.receive_data(frame({"t": "req", "id": 1, "op": "register", "args": args}))
    request = server.next_event()
    assert isinstance(request, Request) and request.op == "register" and request.args == args
    walked = [
        (WRITE_OPS, {"t": "req", "id": 2, "op": "service_get", "args": args}),  # not a checked op
        (WRITE_OPS, {"t": "req", "id": 3, "op": "register", "args": {}, "x": args}),  # outside args
        (frozenset(), {"t": "req", "id": 4, "op": "register", "args": args}),  # nothing checked
    ]
    for checked_ops, obj in walked:
        server = server_after_hello(checked_ops)
        server.receive_data(frame(obj))
        with pytest.raises(ProtocolError):
            server.next_event()
    # Before the handshake nothing is unwalked.
    server = ServerConnection(checked_ops=WRITE_OPS)
    server.receive_data(frame({"t": "req", "id": 1, "op": "register", "args": args}))
    with pytest.raises(ProtocolError):
        server.next_event()


def test_zero_length_frame_is_protocol_error() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\x00\x00\x00\x00")
    with pytest.raises(ProtocolError, match="zero-length"):
        decoder.next_frame()


GOOD_FRAMES = [
    {"t": "x"},
    {"a": None, "b": True, "c": -(2**63), "d": 2**64 - 1, "e": 1.5, "f": "ü", "g": b"\x00\xff"},
    {"l": [], "m": {}, "n": [[], {"k": [1, {"z": b""}]}]},
    nested(NESTING_DEPTH_MAX),
    nested(NESTING_DEPTH_MAX, empty=True),
]


@pytest.mark.parametrize("obj", GOOD_FRAMES)
@pytest.mark.parametrize("chunk", [1, 2, 5, 1 << 20])
def test_frames_round_trip_in_any_chunking(obj: dict[str, Any], chunk: int) -> None:
    data = encode_frame(obj) * 3
    decoder = FrameDecoder()
    out = []
    for i in range(0, len(data), chunk):
        decoder.feed(data[i : i + chunk])
        while (got := decoder.next_frame()) is not None:
            out.append(got)
    assert out == [obj] * 3
    assert decoder.pending_bytes == 0


@pytest.mark.parametrize("limit", [16, 300, FRAME_BYTES_MAX_DEFAULT])
def test_frame_limit_boundary(limit: int) -> None:
    ok, too_big = sized(limit), sized(limit + 1)
    assert len(encode_frame(ok, limit)) == limit + 4
    with pytest.raises(FrameTooLarge):
        encode_frame(too_big, limit)
    decoder = FrameDecoder(limit)
    decoder.feed(frame(ok))
    assert decoder.next_frame() == ok
    decoder.feed(frame(too_big))
    with pytest.raises(FrameTooLarge):
        decoder.next_frame()


def test_oversize_prefix_rejected_before_body_arrives() -> None:
    decoder = FrameDecoder(100)
    decoder.feed(struct.pack(">I", 101))
    decoder.feed(b"x" * 10_000)  # dropped, not buffered
    assert decoder.pending_bytes == 0
    with pytest.raises(FrameTooLarge):
        decoder.next_frame()


def test_frames_before_an_oversize_prefix_are_delivered() -> None:
    decoder = FrameDecoder(100)
    decoder.feed(frame({"t": "a"}) + struct.pack(">I", 2**32 - 1) + b"junk")
    assert decoder.next_frame() == {"t": "a"}
    assert decoder.pending_bytes == 0  # the oversize frame was refused at its prefix
    with pytest.raises(FrameTooLarge):
        decoder.next_frame()


@given(length=st.integers(101, 2**32 - 1), tail=st.binary(max_size=200))
def test_any_oversize_prefix_is_refused_without_buffering(length: int, tail: bytes) -> None:
    decoder = FrameDecoder(100)
    decoder.feed(struct.pack(">I", length) + tail)
    assert decoder.pending_bytes == 0
    with pytest.raises(FrameTooLarge):
        decoder.next_frame()


@pytest.mark.parametrize(
    "obj",
    [
        pytest.param({1: 2}, id="int-key"),
        pytest.param({"a": object()}, id="unencodable"),
        pytest.param({"a": 2**64}, id="int-overflow"),
        pytest.param(nested(NESTING_DEPTH_MAX + 1), id="too-deep"),
        pytest.param([1], id="not-a-map"),
    ],
)
def test_encode_refuses_what_the_decoder_would_refuse(obj: Any) -> None:
    with pytest.raises(Internal):
        encode_frame(obj)


@pytest.mark.parametrize("limit", [0, 2**32])
def test_frame_limit_must_fit_the_prefix(limit: int) -> None:
    with pytest.raises(InvalidArgument):
        FrameDecoder(limit)


# -- hypothesis strategies ---------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
values = st.recursive(
    scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
    max_leaves=16,
)
maps = st.dictionaries(st.text(max_size=6), values, max_size=5)
ids = st.integers(0, REQUEST_ID_MAX)
revs = st.integers(0, 2**64 - 1)
error_classes = [c for c in errors.CODES.values() if c is not RegistryError]
errs = st.builds(
    lambda cls, msg, hint: cls(msg, hint=hint),
    st.sampled_from(error_classes),
    st.text(min_size=1, max_size=30),
    st.none() | st.text(max_size=30),
)
op_names = st.text(min_size=1, max_size=OP_NAME_CHARS_MAX)
client_messages = st.builds(Request, ids, op_names, maps) | st.builds(Cancel, ids)
server_messages = (
    st.builds(lambda i, r, b: Response(i, r, body=b), ids, revs, values)
    | st.builds(lambda i, r, e: Response(i, r, error=e), ids, revs, errs)
    | st.builds(StreamEvent, ids, values)
    | st.builds(StreamEnd, ids, st.none() | errs)
)


@FUZZ
@given(obj=maps, cuts=st.lists(st.integers(1, 50), max_size=10))
def test_frame_round_trip_property(obj: dict[str, Any], cuts: list[int]) -> None:
    data = encode_frame(obj)
    decoder = FrameDecoder()
    for cut in [*cuts, len(data)]:
        decoder.feed(data[:cut])
        data = data[cut:]
    assert decoder.next_frame() == obj
    assert decoder.next_frame() is None


@FUZZ
@given(msgs=st.lists(client_messages, max_size=5), chunk=st.integers(1, 64))
def test_client_messages_round_trip(msgs: list[Request | Cancel], chunk: int) -> None:
    client = client_after_hello()
    server = server_after_hello()
    data = b"".join(client.send(m) for m in msgs)
    # Distinct ids only: a repeated open id is (correctly) a BadMessage.
    seen: set[int] = set()
    expected = []
    for m in msgs:
        if isinstance(m, Request) and m.id in seen:
            expected.append(("BadMessage", m.id))
        else:
            expected.append(wire(m))
            if isinstance(m, Request):
                seen.add(m.id)
    got = feed(server, data, chunk)
    assert [("BadMessage", g.id) if isinstance(g, BadMessage) else wire(g) for g in got] == expected


@FUZZ
@given(msgs=st.lists(server_messages, max_size=5), chunk=st.integers(1, 64))
def test_server_messages_round_trip(msgs: list[Any], chunk: int) -> None:
    server = server_after_hello()
    client = client_after_hello()
    data = b"".join(server.send(m) for m in msgs)
    assert [wire(g) for g in feed(client, data, chunk)] == [wire(m) for m in msgs]


@FUZZ
@given(data=st.binary(max_size=300), chunk=st.integers(1, 40), hello_first=st.booleans(), eof=st.booleans())
def test_arbitrary_bytes_never_crash_the_server(
    data: bytes, chunk: int, hello_first: bool, eof: bool
) -> None:
    server = ServerConnection(frame_bytes_max=64)
    prefix = frame({"t": "hello", "v": PROTOCOL_VERSION, "client": "f"}) if hello_first else b""
    try:
        feed(server, prefix + data, chunk)
        if eof:
            server.receive_data(b"")
            drain(server)
    except RegistryError:
        pass
    server.send(Bye(ProtocolError("x")))  # must work whatever state the fuzz left


CLIENT_EVENTS = (Hello, Request, Cancel, BadMessage)
SERVER_EVENTS = (HelloOk, Response, StreamEvent, StreamEnd, Bye)
fuzz_maps = st.dictionaries(
    st.sampled_from(["t", "id", "op", "args", "v", "token", "client", "x"]),
    st.sampled_from(["req", "cancel", "hello", "res", "ev"]) | values,
    max_size=5,
)


@FUZZ
@given(objs=st.lists(fuzz_maps, max_size=6), hello_first=st.booleans())
def test_arbitrary_maps_give_events_or_registry_errors(objs: list[dict[str, Any]], hello_first: bool) -> None:
    for conn in (ServerConnection(), ClientConnection()):
        if hello_first:
            conn.receive_data(frame({"t": "hello", "v": 1, "client": "f"}))
            conn.receive_data(frame({"t": "hello_ok", "v": 1, "node": "n", "rev": 0}))
        try:
            for obj in objs:
                conn.receive_data(frame(obj))
                allowed = CLIENT_EVENTS if isinstance(conn, ServerConnection) else SERVER_EVENTS
                assert all(isinstance(event, allowed) for event in drain(conn))
        except RegistryError:
            pass


# -- server connection: tables ------------------------------------------------------

CLIENT_TABLE: list[tuple[dict[str, Any], Any]] = [
    ({"t": "req", "id": 1, "op": "get", "args": {"k": [1]}}, Request(1, "get", {"k": [1]})),
    ({"t": "cancel", "id": 3}, Cancel(3)),
    ({"t": "cancel", "id": 3, "future_field": 1}, Cancel(3)),
    ({"t": "req", "id": 1, "op": "get"}, (1, BadRequest)),
    ({"t": "req", "id": "1", "op": "get", "args": {}}, (None, BadRequest)),
    ({"t": "req", "id": True, "op": "get", "args": {}}, (None, BadRequest)),
    ({"t": "req", "id": -1, "op": "get", "args": {}}, (None, InvalidArgument)),
    ({"t": "req", "id": 1, "op": "", "args": {}}, (1, InvalidArgument)),
    ({"t": "req", "id": 1, "op": 5, "args": {}}, (1, BadRequest)),
    ({"t": "req", "id": 1, "op": "x", "args": [1]}, (1, BadRequest)),
    ({"t": "cancel"}, (None, BadRequest)),
    ({"t": "nope", "id": 7}, (7, BadRequest)),
    ({"t": "res", "id": 7, "rev": 1, "ok": True}, (7, BadRequest)),
    ({"id": 7}, (7, BadRequest)),
    ({"t": 5}, (None, BadRequest)),
    ({"t": "hello", "v": PROTOCOL_VERSION, "client": "again"}, (None, BadRequest)),
]


@pytest.mark.parametrize(("obj", "expected"), CLIENT_TABLE)
def test_server_parses_client_messages(obj: dict[str, Any], expected: Any) -> None:
    server = server_after_hello()
    server.receive_data(frame(obj))
    (event,) = drain(server)
    if isinstance(expected, tuple):
        assert isinstance(event, BadMessage)
        assert (event.id, type(event.error)) == expected
    else:
        assert event == expected
    server.receive_data(frame({"t": "cancel", "id": 9}))  # the connection carries on
    assert drain(server) == [Cancel(9)]


HANDSHAKE_TABLE: list[tuple[dict[str, Any], type[RegistryError]]] = [
    ({"t": "req", "id": 1, "op": "get", "args": {}}, ProtocolError),
    ({"t": "hello", "v": PROTOCOL_VERSION + 1, "token": None, "client": "c"}, VersionMismatch),
    ({"t": "hello", "v": PROTOCOL_VERSION + 1}, VersionMismatch),  # a future hello's fields may differ
    ({"t": "hello", "v": 0, "client": "c"}, VersionMismatch),
    ({"t": "hello", "v": "1", "client": "c"}, ProtocolError),
    ({"t": "hello", "v": PROTOCOL_VERSION, "client": 5}, ProtocolError),
    ({"t": "hello", "v": PROTOCOL_VERSION, "client": "c", "token": 5}, ProtocolError),
    ({"t": "hello", "v": PROTOCOL_VERSION, "client": "x" * (CLIENT_NAME_CHARS_MAX + 1)}, ProtocolError),
    (
        {"t": "hello", "v": PROTOCOL_VERSION, "client": "c", "token": "x" * (TOKEN_CHARS_MAX + 1)},
        ProtocolError,
    ),
]


@pytest.mark.parametrize(("obj", "error"), HANDSHAKE_TABLE)
def test_bad_handshake_raises_and_sticks(obj: dict[str, Any], error: type[RegistryError]) -> None:
    server = ServerConnection()
    server.receive_data(frame(obj))
    with pytest.raises(error) as first:
        server.next_event()
    assert type(first.value) is error
    with pytest.raises(error) as again:
        server.next_event()
    assert again.value is first.value
    client = ClientConnection()
    client.receive_data(server.send(Bye(first.value)))
    (bye,) = drain(client)
    assert isinstance(bye, Bye) and type(bye.error) is error


@pytest.mark.parametrize(
    ("token", "client"),
    [(None, ""), ("x" * TOKEN_CHARS_MAX, "c" * CLIENT_NAME_CHARS_MAX)],
)
def test_hello_field_limits_at_max(token: str | None, client: str) -> None:
    server = ServerConnection()
    server.receive_data(frame({"t": "hello", "v": PROTOCOL_VERSION, "token": token, "client": client}))
    assert server.next_event() == Hello(PROTOCOL_VERSION, token, client)


def test_request_limits_at_boundary() -> None:
    server = server_after_hello()
    server.receive_data(frame({"t": "req", "id": REQUEST_ID_MAX, "op": "o" * OP_NAME_CHARS_MAX, "args": {}}))
    server.receive_data(frame({"t": "req", "id": REQUEST_ID_MAX + 1, "op": "get", "args": {}}))
    server.receive_data(frame({"t": "req", "id": 0, "op": "o" * (OP_NAME_CHARS_MAX + 1), "args": {}}))
    ok, bad_id, bad_op = drain(server)
    assert ok == Request(REQUEST_ID_MAX, "o" * OP_NAME_CHARS_MAX, {})
    assert bad_id.id is None and type(bad_id.error) is InvalidArgument
    assert bad_op.id == 0 and type(bad_op.error) is InvalidArgument
    # The same checks guard local construction.
    with pytest.raises(InvalidArgument):
        Request(REQUEST_ID_MAX + 1, "get", {})
    with pytest.raises(InvalidArgument):
        Hello(PROTOCOL_VERSION, "x" * (TOKEN_CHARS_MAX + 1), "c")


class _IntSub(int):
    pass


@pytest.mark.parametrize(
    ("request_id", "op", "args", "error"),
    [
        (0, "get", {}, None),
        (REQUEST_ID_MAX, "o" * OP_NAME_CHARS_MAX, {"a": {"b": [1, 2.5, None, b"x"]}}, None),
        (_IntSub(7), "get", {}, None),  # an int subclass is an int, as the shared check says
        (REQUEST_ID_MAX + 1, "get", {}, InvalidArgument),
        (-1, "get", {}, InvalidArgument),
        (True, "get", {}, BadRequest),
        ("1", "get", {}, BadRequest),
        (1, "", {}, InvalidArgument),
        (1, "o" * (OP_NAME_CHARS_MAX + 1), {}, InvalidArgument),
        (1, b"get", {}, BadRequest),
        (1, "get", [], BadRequest),
        (1, "get", {1: "int key"}, Internal),  # outside the data model: refused before it is sent
        (1, "get", {"a": {1, 2}}, Internal),
        # The client walks a write's args too: the node's decoder refuses int keys outright.
        (1, "register", {1: "int key"}, Internal),
    ],
)
def test_client_send_request_matches_send_of_a_request(request_id: Any, op: Any, args: Any,
                                                       error: type[RegistryError] | None) -> None:
    """The client's event-free request path checks and encodes exactly like ``send(Request(...))``."""
    client = ClientConnection()
    client.send(Hello(PROTOCOL_VERSION, None, "c"))
    if error is None:
        assert client.send_request(request_id, op, args) == client.send(Request(request_id, op, args))
        return
    with pytest.raises(error):
        client.send_request(request_id, op, args)
    with pytest.raises(error):
        client.send(Request(request_id, op, args))


def test_encode_frame_with_a_reused_packer_matches_packb_and_survives_failures() -> None:
    """A shared Packer gives packb's bytes, and a frame it cannot encode leaves it clean for the next."""
    pack = msgpack.Packer(use_bin_type=True).pack
    good = {"t": "res", "id": 1, "rev": 2, "ok": True, "body": {"b": b"\x00", "f": 1.5, "l": [None, True]}}
    assert encode_frame(good, pack=pack) == encode_frame(good)
    for bad, error in (({"x": object()}, Internal), ({"x": 1 << 70}, Internal)):
        with pytest.raises(error):
            encode_frame(bad, check_model=False, pack=pack)
        assert encode_frame(good, pack=pack) == encode_frame(good)
    with pytest.raises(FrameTooLarge):
        encode_frame({"x": "y" * 100}, 50, pack=pack)
    assert encode_frame(good, pack=pack) == encode_frame(good)


def test_client_send_request_needs_hello_first() -> None:
    with pytest.raises(Internal, match="hello first"):
        ClientConnection().send_request(1, "get", {})


def test_open_request_limit_at_boundary() -> None:
    server = server_after_hello()
    data = b"".join(
        frame({"t": "req", "id": i, "op": "w", "args": {}}) for i in range(STREAMS_PER_CONNECTION_MAX + 1)
    )
    server.receive_data(data)
    events = drain(server)
    assert all(isinstance(e, Request) for e in events[:-1]) and len(events) == STREAMS_PER_CONNECTION_MAX + 1
    last = events[-1]
    assert isinstance(last, BadMessage) and last.id == STREAMS_PER_CONNECTION_MAX
    assert type(last.error) is LimitExceeded
    server.send(Response(last.id, 0, error=last.error))
    assert server.open_requests == STREAMS_PER_CONNECTION_MAX
    server.send(StreamEnd(0))  # closing one makes room for one
    server.receive_data(frame({"t": "req", "id": 5000, "op": "w", "args": {}}))
    assert drain(server) == [Request(5000, "w", {})]


def test_request_ids_close_on_final_reply_or_finished() -> None:
    server = server_after_hello()
    server.receive_data(b"".join(frame({"t": "req", "id": i, "op": "w", "args": {}}) for i in (1, 2, 3)))
    assert len(drain(server)) == 3
    server.send(StreamEvent(1, {"n": 1}))  # not final
    assert server.open_requests == 3
    server.send(Response(1, 0, body=None))
    server.send(StreamEnd(2, Timeout("t")))
    server.finished(3)
    server.finished(3)  # idempotent
    server.send(Response(3, 0))  # a reply for an id no longer open is allowed
    assert server.open_requests == 0
    server.receive_data(b"".join(frame({"t": "req", "id": i, "op": "w", "args": {}}) for i in (1, 2, 3)))
    assert all(isinstance(e, Request) for e in drain(server))


def test_duplicate_id_rejection_reply_keeps_the_original_open() -> None:
    server = server_after_hello()
    req = frame({"t": "req", "id": 5, "op": "w", "args": {}})
    server.receive_data(req + req + frame({"t": "req", "id": 5, "op": 1, "args": {}}))
    original, dup, malformed = drain(server)
    assert isinstance(original, Request)
    assert isinstance(dup, BadMessage) and dup.id == 5 and type(dup.error) is BadRequest
    assert "duplicate" in dup.error.message
    assert isinstance(malformed, BadMessage) and malformed.id == 5
    server.send(Response(5, 0, error=dup.error))
    server.send(Response(5, 0, error=malformed.error))
    assert server.open_requests == 1  # the original still runs
    server.receive_data(req)
    (again,) = drain(server)
    assert isinstance(again, BadMessage)
    server.send(Response(5, 0, error=again.error))
    server.send(Response(5, 0, body="done"))
    assert server.open_requests == 0


def test_frame_too_large_on_send_leaves_the_request_open() -> None:
    server = server_after_hello()
    server.receive_data(frame({"t": "req", "id": 1, "op": "list", "args": {}}))
    drain(server)
    with pytest.raises(FrameTooLarge):
        server.send(Response(1, 0, body="x" * FRAME_BYTES_MAX_DEFAULT))
    assert server.open_requests == 1
    server.send(Response(1, 0, error=LimitExceeded("listing too large")))
    assert server.open_requests == 0


def test_eof_handling() -> None:
    server = server_after_hello()
    server.receive_data(frame({"t": "cancel", "id": 1}) + b"")
    server.receive_data(b"")
    assert server.next_event() == Cancel(1)  # buffered events come first
    assert server.next_event() is CLOSED
    assert server.next_event() is CLOSED
    torn = server_after_hello()
    torn.receive_data(frame({"t": "cancel", "id": 1})[:-1])
    torn.receive_data(b"")
    with pytest.raises(ProtocolError, match="middle of a frame"):
        torn.next_event()
    with pytest.raises(Internal):
        torn.receive_data(b"more")


def test_bye_works_after_a_framing_error_and_ends_the_conversation() -> None:
    server = server_after_hello()
    server.receive_data(b"\xff\xff\xff\xff")
    with pytest.raises(FrameTooLarge) as exc:
        server.next_event()
    data = server.send(Bye(exc.value))
    client = client_after_hello()
    client.receive_data(data + frame({"t": "ev", "id": 1, "body": None}))
    (bye,) = drain(client)
    assert isinstance(bye, Bye) and type(bye.error) is FrameTooLarge
    assert client.next_event() is CLOSED  # nothing after bye counts
    with pytest.raises(Internal):
        server.send(Response(1, 0))


@pytest.mark.parametrize(
    "step",
    [
        pytest.param(lambda: ServerConnection().send(Response(1, 0)), id="server-reply-before-hello"),
        pytest.param(lambda: ServerConnection().send(HelloOk(1, "n", 0)), id="hello-ok-before-hello"),
        pytest.param(lambda: server_after_hello().send(HelloOk(1, "n", 0)), id="hello-ok-twice"),
        pytest.param(lambda: server_after_hello().send(Cancel(1)), id="server-sends-client-event"),  # type: ignore[arg-type]
        pytest.param(lambda: server_after_hello().send(Response(1, 0, body=object())), id="unencodable"),
        pytest.param(lambda: server_after_hello().send(Response(1, 0, body={1: 2})), id="int-key-body"),
        pytest.param(lambda: ClientConnection().send(Request(1, "get", {})), id="request-before-hello"),
        pytest.param(lambda: client_after_hello().send(Hello(1, None, "c")), id="hello-twice"),
        pytest.param(lambda: client_after_hello().send(Bye(Internal())), id="client-sends-bye"),  # type: ignore[arg-type]
    ],
)
def test_local_misuse_raises_internal(step: Any) -> None:
    with pytest.raises(Internal):
        step()


# -- client connection: tables ------------------------------------------------------

SERVER_TABLE: list[tuple[dict[str, Any], Any]] = [
    ({"t": "res", "id": 1, "rev": 5, "ok": True, "body": {"a": 1}}, Response(1, 5, body={"a": 1})),
    ({"t": "res", "id": 1, "rev": 5, "ok": True}, Response(1, 5)),
    ({"t": "res", "id": 1, "rev": 5, "ok": False, "err": {"code": "NOT_FOUND", "message": "m"}}, NotFound),
    (
        {"t": "res", "id": 1, "rev": 5, "ok": False, "err": {"code": "NEW_CODE", "message": "m"}},
        RegistryError,
    ),
    ({"t": "ev", "id": 2, "body": [1, "x"]}, StreamEvent(2, [1, "x"])),
    ({"t": "end", "id": 2}, StreamEnd(2)),
    ({"t": "end", "id": 2, "err": {"code": "TIMEOUT", "message": "m"}}, Timeout),
    ({"t": "bye", "err": {"code": "FRAME_TOO_LARGE", "message": "m"}}, FrameTooLarge),
    ({"t": "res", "id": 1, "rev": 5, "ok": False}, ProtocolError),
    ({"t": "res", "id": 1, "rev": 5, "ok": "yes", "body": 1}, ProtocolError),
    ({"t": "res", "id": 1, "rev": -1, "ok": True}, ProtocolError),
    ({"t": "res", "id": 1, "rev": 5, "ok": False, "err": "boom"}, ProtocolError),
    ({"t": "ev", "body": 1}, ProtocolError),
    ({"t": "bye"}, ProtocolError),
    ({"t": "req", "id": 1, "op": "x", "args": {}}, ProtocolError),
    ({"t": "hello_ok", "v": PROTOCOL_VERSION, "node": "n", "rev": 0}, ProtocolError),  # duplicate
]


@pytest.mark.parametrize(("obj", "expected"), SERVER_TABLE)
def test_client_parses_server_messages(obj: dict[str, Any], expected: Any) -> None:
    client = client_after_hello()
    client.receive_data(frame(obj))
    if expected is ProtocolError:
        with pytest.raises(ProtocolError) as exc:
            client.next_event()
        assert type(exc.value) is ProtocolError
        with pytest.raises(ProtocolError):
            client.next_event()  # sticky
        return
    event = client.next_event()
    if isinstance(expected, type):
        assert type(event.error) is expected  # type: ignore[union-attr]
    else:
        assert wire(event) == wire(expected)


@pytest.mark.parametrize(
    ("obj", "error"),
    [
        ({"t": "res", "id": 1, "rev": 0, "ok": True}, ProtocolError),
        ({"t": "hello_ok", "v": PROTOCOL_VERSION + 1, "node": "n", "rev": 0}, VersionMismatch),
    ],
)
def test_client_handshake_errors(obj: dict[str, Any], error: type[RegistryError]) -> None:
    client = ClientConnection()
    client.send(Hello(PROTOCOL_VERSION, "tok", "c"))
    client.receive_data(frame(obj))
    with pytest.raises(error):
        client.next_event()


def test_client_accepts_bye_instead_of_hello_ok() -> None:
    client = ClientConnection()
    client.send(Hello(PROTOCOL_VERSION, "bad", "c"))
    client.receive_data(frame({"t": "bye", "err": {"code": "UNAUTHENTICATED", "message": "no"}}))
    (bye,) = drain(client)
    assert isinstance(bye, Bye) and bye.error.code == "UNAUTHENTICATED"


# -- a connected pair ------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 7, 1 << 16])
def test_connected_pair_conversation(chunk: int) -> None:
    client, server = ClientConnection(), ServerConnection()

    def to_server(data: bytes) -> list[Any]:
        return feed(server, data, chunk)

    def to_client(data: bytes) -> list[Any]:
        return feed(client, data, chunk)

    # Hello and two pipelined requests in one write.
    data = client.send(Hello(PROTOCOL_VERSION, "secret", "regctl/1.0"))
    data += client.send(Request(1, "get", {"service": "api"}))
    data += client.send(Request(2, "watch", {"prefix": "a", "since": 0}))
    hello, get, watch = to_server(data)
    assert hello == Hello(PROTOCOL_VERSION, "secret", "regctl/1.0")
    assert get == Request(1, "get", {"service": "api"})
    assert watch == Request(2, "watch", {"prefix": "a", "since": 0})

    out = server.send(HelloOk(PROTOCOL_VERSION, "node-1", 41))
    out += server.send(
        Response(1, 41, body={"instances": [{"host": "10.0.0.1", "port": 80, "meta": b"\x01"}]})
    )
    out += server.send(StreamEvent(2, {"rev": 42, "op": "put"}))
    out += server.send(StreamEvent(2, {"rev": 43, "op": "delete"}))
    events = to_client(out)
    assert [type(e) for e in events] == [HelloOk, Response, StreamEvent, StreamEvent]
    assert events[1].body["instances"][0]["meta"] == b"\x01"
    assert server.open_requests == 1

    assert to_server(client.send(Cancel(2))) == [Cancel(2)]
    (end,) = to_client(server.send(StreamEnd(2)))
    assert end == StreamEnd(2)
    assert server.open_requests == 0

    good, bad = to_server(client.send(Request(3, "x" * OP_NAME_CHARS_MAX, {})) + frame({"t": "req", "id": 4}))
    assert good == Request(3, "x" * OP_NAME_CHARS_MAX, {})
    assert isinstance(bad, BadMessage) and bad.id == 4
    (err,) = to_client(server.send(Response(4, 43, error=bad.error)))
    assert isinstance(err, Response) and type(err.error) is BadRequest

    server.receive_data(b"")
    client.receive_data(b"")
    assert server.next_event() is CLOSED and client.next_event() is CLOSED


def test_sentinels() -> None:
    assert repr(NEED_DATA) == "NEED_DATA" and repr(CLOSED) == "CLOSED"
    assert ServerConnection().next_event() is NEED_DATA
