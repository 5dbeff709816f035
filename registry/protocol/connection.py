"""Sans-IO connection state machines: bytes in, events out; events in, bytes out.

Theory of operation
-------------------
A connection object owns a ``FrameDecoder`` and the protocol state of one
side of one TCP connection, and nothing else: no socket, no task, no clock.
The asyncio shell drives it::

    conn.receive_data(await reader.read(65536))   # b"" = EOF
    while True:
        event = conn.next_event()                  # may raise RegistryError
        if event is NEED_DATA: break               # read more
        if event is CLOSED: ...                    # peer done, or we said bye
        handle(event)
    writer.write(conn.send(Response(...)))

``next_event`` raises a ``RegistryError`` (always a ``ProtocolError``
subclass) when the byte stream or the handshake is broken.  That is sticky:
every later ``next_event`` raises the same error.  A server then sends
``conn.send(Bye(err))`` -- which works in every state, including after such an
error -- and closes.  Every other problem with a client message only costs
that message: the server gets a ``BadMessage`` event, answers it with an error
``Response`` when it has an id, and the connection carries on.

``send`` raises ``FrameTooLarge`` when the encoded event exceeds the frame
limit (nothing is recorded, so the caller can send an error instead) and
``Internal`` for misuse (wrong event type or order, unencodable body).

Request bookkeeping (server side): an id is *open* from its ``Request`` until
the server sends the final reply (``Response`` or ``StreamEnd``) or calls
``finished(id)``; both are idempotent.  At most
``STREAMS_PER_CONNECTION_MAX`` ids may be open.  A message that reuses an
open id is rejected with a ``BadMessage`` for that id; the error ``Response``
answering it must not close the original request, so such rejections are
counted and the next error ``Response`` for that id consumes one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, NoReturn

from registry.errors import BadRequest, Internal, LimitExceeded, ProtocolError, RegistryError, VersionMismatch
from registry.protocol.frames import FRAME_BYTES_MAX_DEFAULT, FrameDecoder, check_frame_model, encode_frame
from registry.protocol.messages import (
    PROTOCOL_VERSION,
    STREAMS_PER_CONNECTION_MAX,
    BadMessage,
    Bye,
    Cancel,
    ClientMessage,
    Hello,
    HelloOk,
    Request,
    Response,
    ServerMessage,
    StreamEnd,
    StreamEvent,
    check_request_fields,
    parse_client_message,
    parse_server_message,
    request_id_of,
)

__all__ = ["NEED_DATA", "CLOSED", "NeedData", "Closed", "ServerConnection", "ClientConnection"]


class NeedData:
    """``next_event`` result: no complete event buffered; feed more bytes."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


class Closed:
    """``next_event`` result: no more events will come (EOF, or bye said/heard)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "CLOSED"


#: The only instances; compare with ``is`` or match with ``isinstance``.
NEED_DATA: Final = NeedData()
CLOSED: Final = Closed()


class _Connection:
    """Framing, EOF and sticky-error handling shared by both sides."""

    __slots__ = ("_decoder", "_eof", "_error", "_finished", "_frame_bytes_max", "_pack")

    def __init__(self, frame_bytes_max: int = FRAME_BYTES_MAX_DEFAULT, *, check_model: bool = True,
                 pack: Callable[[Any], bytes] | None = None) -> None:
        self._frame_bytes_max = frame_bytes_max
        #: A reused Packer's ``pack`` (see ``encode_frame``), or None for ``msgpack.packb``.
        self._pack = pack
        self._decoder = FrameDecoder(frame_bytes_max, check_model=check_model)
        self._eof = False
        self._error: RegistryError | None = None
        # Set once a bye was sent or received: nothing after it matters.
        self._finished = False

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the peer; ``b""`` means the peer closed (EOF).

        Never raises for bad input: problems surface from ``next_event``.
        """
        if not data:
            self._eof = True
        elif self._eof:
            raise Internal("receive_data after EOF")
        else:
            self._decoder.feed(data)

    def _next_frame(self) -> dict[str, Any] | NeedData | Closed:
        if self._error is not None:
            raise self._error.with_traceback(None)
        if self._finished:
            return CLOSED
        try:
            frame = self._decoder.next_frame()
        except RegistryError as exc:
            self._fail(exc)
        if frame is not None:
            return frame
        if not self._eof:
            return NEED_DATA
        if self._decoder.pending_bytes:
            self._fail(ProtocolError("connection closed in the middle of a frame"))
        return CLOSED

    def _fail(self, exc: RegistryError) -> NoReturn:
        """Make ``exc`` the connection's sticky error and raise it."""
        self._error = exc
        raise exc

    def _encode(self, event: ClientMessage | ServerMessage, check_model: bool = True) -> bytes:
        return encode_frame(event.to_wire(), self._frame_bytes_max, check_model=check_model, pack=self._pack)


class ServerConnection(_Connection):
    """The server's side: enforces the handshake and tracks open request ids."""

    __slots__ = ("_checked_ops", "_hello_ok_sent", "_hello_received", "_open", "_owed_rejections")

    def __init__(self, frame_bytes_max: int = FRAME_BYTES_MAX_DEFAULT, *,
                 pack: Callable[[Any], bytes] | None = None, checked_ops: frozenset[str] = frozenset()) -> None:
        """``pack``: a Packer's ``pack`` to share between the connections of one thread (see ``encode_frame``).

        ``checked_ops``: ops whose args the server checks field by field by exact type before
        anything reads them (``RegistryAPI.field_checked_ops``, at most ``registry.fsm.ops.WRITE_OPS``): their
        args skip the data-model walk; every other part of every frame is walked.
        """
        # The walk runs in next_event, once the op is known.
        super().__init__(frame_bytes_max, check_model=False, pack=pack)
        self._checked_ops = checked_ops
        self._hello_received = False
        self._hello_ok_sent = False
        self._open: set[int] = set()
        # id -> error Responses owed for rejected messages reusing that open id.
        self._owed_rejections: dict[int, int] = {}

    @property
    def open_requests(self) -> int:
        """How many request ids are open (awaiting their final reply)."""
        return len(self._open)

    def next_event(self) -> ClientMessage | BadMessage | NeedData | Closed:
        """The next event from the client; raises ``ProtocolError`` (sticky) if the stream broke."""
        frame = self._next_frame()
        if isinstance(frame, NeedData | Closed):
            return frame
        try:
            check_frame_model(frame, ProtocolError, except_key="args" if self._args_checked(frame) else None)
        except ProtocolError as exc:
            self._fail(exc)
        if not self._hello_received:
            return self._handshake(frame)
        try:
            msg = parse_client_message(frame)
        except BadRequest as exc:
            return self._reject(request_id_of(frame), exc)
        if isinstance(msg, Hello):
            return self._reject(None, BadRequest("duplicate hello"))
        if isinstance(msg, Request):
            if msg.id in self._open:
                return self._reject(msg.id, BadRequest("duplicate request id"))
            if len(self._open) >= STREAMS_PER_CONNECTION_MAX:
                return self._reject(
                    msg.id, LimitExceeded(f"more than {STREAMS_PER_CONNECTION_MAX} open requests")
                )
            self._open.add(msg.id)
        return msg

    def _args_checked(self, frame: dict[str, Any]) -> bool:
        if not self._hello_received or frame.get("t") != "req":
            return False
        op = frame.get("op")
        return type(op) is str and op in self._checked_ops

    def _handshake(self, frame: dict[str, Any]) -> Hello:
        if frame.get("t") != "hello":
            self._fail(ProtocolError("expected hello"))
        version = frame.get("v")
        # Check the version before any other field: another version's hello
        # may legitimately carry different fields.
        if isinstance(version, int) and not isinstance(version, bool) and version != PROTOCOL_VERSION:
            self._fail(
                VersionMismatch(f"client speaks protocol {version}; this server speaks {PROTOCOL_VERSION}")
            )
        try:
            hello = parse_client_message(frame)
        except BadRequest as exc:
            self._fail(ProtocolError(f"malformed hello: {exc.message}"))
        assert isinstance(hello, Hello)
        self._hello_received = True
        return hello

    def _reject(self, request_id: int | None, error: RegistryError) -> BadMessage:
        if request_id is not None and request_id in self._open:
            self._owed_rejections[request_id] = self._owed_rejections.get(request_id, 0) + 1
        return BadMessage(request_id, error)

    def send(self, event: object, *, body_in_model: bool = False) -> bytes:
        """Encode ``event`` for the client.  ``Bye`` works in any state.

        ``event`` is typed ``object`` and checked below, so a wrong one is
        ``Internal`` in a mypyc-compiled build too, not a ``TypeError`` (#24).

        ``body_in_model``: the caller vouches that the event's body is in the
        protocol's data model (built from state records, say), so the encoder's
        data-model walk is skipped (see ``encode_frame``).
        """
        if isinstance(event, Bye):
            data = self._encode(event)
            self._finished = True
            return data
        if self._finished:
            raise Internal("connection already said bye")
        if isinstance(event, HelloOk):
            if not self._hello_received or self._hello_ok_sent:
                raise Internal("hello_ok must answer the client's hello, once")
            data = self._encode(event)
            self._hello_ok_sent = True
            return data
        if not isinstance(event, Response | StreamEvent | StreamEnd):
            raise Internal(f"a server cannot send {type(event).__name__}")
        if not self._hello_ok_sent:
            raise Internal("send hello_ok before any reply")
        data = self._encode(event, not body_in_model)
        if isinstance(event, Response | StreamEnd):
            # An error Response may be the answer owed to a rejected message
            # that reused this id; that one must leave the original open.
            owed = (
                isinstance(event, Response) and event.error is not None and self._consume_rejection(event.id)
            )
            if not owed:
                self.finished(event.id)  # ids not open are fine: replies may race
        return data

    def _consume_rejection(self, request_id: int) -> bool:
        owed = self._owed_rejections.get(request_id, 0)
        if not owed:
            return False
        if owed == 1:
            del self._owed_rejections[request_id]
        else:
            self._owed_rejections[request_id] = owed - 1
        return True

    def finished(self, request_id: int) -> None:
        """Mark ``request_id`` as no longer open.  Idempotent; ``send`` calls it for final replies."""
        self._open.discard(request_id)


#: How a ``StreamEvent`` frame body starts: fixmap(3), "t": "ev", "id" (see protocol.shared).
_EV_HEAD: Final = b"\x83\xa1t\xa2ev\xa2id"
_BODY_KEY: Final = b"\xa4body"
#: Bytes of a msgpack unsigned int by its first byte (positive fixint: 1).
_UINT_SIZES: Final = {0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9}


def _stream_event_split(raw: bytes) -> tuple[int, int] | None:
    """(stream id, offset of the body value) of an encoded ``StreamEvent``, or None if it is not one."""
    if not raw.startswith(_EV_HEAD) or len(raw) < len(_EV_HEAD) + 1:
        return None
    at = len(_EV_HEAD)
    first = raw[at]
    size = 1 if first < 0x80 else _UINT_SIZES.get(first)
    if size is None:
        return None
    end = at + size
    if raw[end : end + len(_BODY_KEY)] != _BODY_KEY:
        return None
    request_id = first if size == 1 else int.from_bytes(raw[at + 1 : end], "big")
    return request_id, end + len(_BODY_KEY)


class ClientConnection(_Connection):
    """The client's side: sends hello first, then parses the server's messages.

    A node writes the same stream item to every identical watch (protocol.shared),
    so consecutive ``StreamEvent`` frames often differ only in their stream id.
    The body of such a frame is not decoded again: the event carries the body
    object decoded from the previous one (shared, so callers must not mutate
    stream bodies).  A client with 500 identical watches decodes each item once.
    """

    __slots__ = ("_hello_ok_received", "_hello_sent", "_last_body", "_last_body_bytes")

    def __init__(self, frame_bytes_max: int = FRAME_BYTES_MAX_DEFAULT, *,
                 pack: Callable[[Any], bytes] | None = None) -> None:
        # The node's frames are trusted to be in the data model: no walk (frames.py).
        super().__init__(frame_bytes_max, check_model=False, pack=pack)
        self._hello_sent = False
        self._hello_ok_received = False
        #: The encoded body value of the last StreamEvent decoded, and its decoded object.
        self._last_body_bytes = b""
        self._last_body: Any = None

    def _next_stream_frame(self) -> dict[str, Any] | StreamEvent | NeedData | Closed:
        """Like ``_next_frame``, but a StreamEvent whose body repeats the last one is not decoded."""
        if self._error is not None:
            raise self._error.with_traceback(None)
        if self._finished:
            return CLOSED
        try:
            raw = self._decoder.next_body()
        except RegistryError as exc:
            self._fail(exc)
        if raw is None:
            if not self._eof:
                return NEED_DATA
            if self._decoder.pending_bytes:
                self._fail(ProtocolError("connection closed in the middle of a frame"))
            return CLOSED
        split = _stream_event_split(raw)
        if split is not None and self._last_body_bytes:
            request_id, at = split
            if len(raw) - at == len(self._last_body_bytes) and raw[at:] == self._last_body_bytes:
                return StreamEvent(request_id, self._last_body)
        try:
            frame = self._decoder.decode_body(raw)
        except RegistryError as exc:
            self._fail(exc)
        if split is not None and len(frame) == 3:
            # Exactly {"t", "id", "body"}: the next identical body can reuse this decode.
            self._last_body_bytes = raw[split[1] :]
            self._last_body = frame.get("body")
        return frame

    def send(self, event: object) -> bytes:
        """Encode ``event`` for the server; the first must be ``Hello``."""
        if isinstance(event, Hello):
            if self._hello_sent:
                raise Internal("hello already sent")
            data = self._encode(event)
            self._hello_sent = True
            return data
        if not isinstance(event, Request | Cancel):
            raise Internal(f"a client cannot send {type(event).__name__}")
        if not self._hello_sent:
            raise Internal("send hello first")
        return self._encode(event)

    def send_request(self, request_id: object, op: object, args: object) -> bytes:
        """``send(Request(request_id, op, args))`` without building the event: same checks, same bytes.

        Arguments are ``object``, checked by ``check_request_fields``: a compiled
        build would otherwise raise ``TypeError`` for a str id and turn ``True`` into 1.

        The client's per-request path: the event object would only be turned
        back into a map, and building it was a tenth of a small call's cost.
        """
        if not self._hello_sent:
            raise Internal("send hello first")
        check_request_fields(request_id, op, args)
        return encode_frame({"t": "req", "id": request_id, "op": op, "args": args}, self._frame_bytes_max,
                            pack=self._pack)

    def next_event(self) -> ServerMessage | NeedData | Closed:
        """The next event from the server; raises ``ProtocolError`` (sticky) if it misbehaves.

        Replies for ids the client no longer waits for (say after a local
        timeout) are returned like any other: matching ids is the shell's job.
        """
        frame = self._next_stream_frame() if self._hello_ok_received else self._next_frame()
        if isinstance(frame, NeedData | Closed | StreamEvent):
            return frame
        try:
            msg = parse_server_message(frame)
        except ProtocolError as exc:
            self._fail(exc)
        if isinstance(msg, Bye):
            self._finished = True
        elif isinstance(msg, HelloOk):
            if self._hello_ok_received:
                self._fail(ProtocolError("duplicate hello_ok"))
            if msg.version != PROTOCOL_VERSION:
                self._fail(
                    VersionMismatch(
                        f"server speaks protocol {msg.version}; this client speaks {PROTOCOL_VERSION}"
                    )
                )
            self._hello_ok_received = True
        elif not self._hello_ok_received:
            self._fail(ProtocolError(f"expected hello_ok, got {frame.get('t')!r:.40}"))
        return msg
