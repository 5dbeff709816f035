"""The messages of the client protocol: typed events and their wire maps.

Theory of operation
-------------------
Every frame body is a msgpack map whose ``t`` key names the message type.
Each message is a dataclass that validates its own fields when
constructed, so one set of checks serves both directions: an event built
locally is valid before it is sent, and ``parse_client_message`` /
``parse_server_message`` turn a decoded map into an event simply by reading
the fields and calling the constructor.

Messages are immutable by convention.  Most are frozen dataclasses; the three
built for every request on both sides (``Request``, ``Response``,
``StreamEvent``) are not, because a frozen dataclass's ``__init__`` sets each
field through ``object.__setattr__``: a ``Response`` cost 2.85 us to build
frozen and 1.36 us not, paid twice per request.  Their checks inline the
common case for the same reason and call the shared checks only to fail.

Compatibility rules: a required field that is missing, or any field of the
wrong type or out of range, makes the message malformed.  Nullable fields
(``token``, ``body``, a ``StreamEnd``'s ``err``) may be omitted, meaning
None.  Unknown extra keys are ignored, so a later version can add fields.

Direction matters for what "malformed" costs.  A server that receives a
malformed *message* (the frame decoded fine) answers it with an error and
keeps the connection: validation raises ``BadRequest`` (or a subclass) and the
connection turns it into a ``BadMessage`` event.  A client that receives a
malformed message from its server has no one to tell, so the client
connection reports ``ProtocolError``.

A conversation::

    client                                server
    Hello(v, token, client)      ->
                                 <-       HelloOk(v, node, rev)
    Request(id=1, op, args)      ->
                                 <-       Response(id=1, rev, body | error)
    Request(id=2, "watch", ...)  ->
                                 <-       StreamEvent(id=2, body) ...
    Cancel(id=2)                 ->
                                 <-       StreamEnd(id=2, error?)
                                 <-       Bye(error)   (stream broken; closing)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from registry.errors import (
    BadRequest,
    InvalidArgument,
    ProtocolError,
    RegistryError,
    error_from_wire,
    error_to_wire,
)

__all__ = [
    "PROTOCOL_VERSION",
    "OP_NAME_CHARS_MAX",
    "REQUEST_ID_MAX",
    "TOKEN_CHARS_MAX",
    "CLIENT_NAME_CHARS_MAX",
    "STREAMS_PER_CONNECTION_MAX",
    "Hello",
    "Request",
    "Cancel",
    "HelloOk",
    "Response",
    "StreamEvent",
    "StreamEnd",
    "Bye",
    "BadMessage",
    "check_request_fields",
    "ClientMessage",
    "ServerMessage",
    "parse_client_message",
    "parse_server_message",
    "request_id_of",
]

#: Bumped on any incompatible change; the handshake refuses a mismatch.
PROTOCOL_VERSION: Final = 1

#: Longest op name, in characters: real ones are ~15; bounds log and metric labels.
OP_NAME_CHARS_MAX: Final = 64
#: Largest request id.  2**53 - 1 is JavaScript's Number.MAX_SAFE_INTEGER, so a
#: JS client can hold any id exactly (2**53 itself is not "safe": 2**53 + 1
#: rounds to it).
REQUEST_ID_MAX: Final = 2**53 - 1
#: Longest auth token, in characters: 256-bit secrets in any text encoding fit.
TOKEN_CHARS_MAX: Final = 512
#: Longest client name, in characters: it is only a label for logs.
CLIENT_NAME_CHARS_MAX: Final = 128
#: Requests/streams open at once on one connection; each costs the server a
#: task and maybe a watch, so one client cannot exhaust a node.  Enforced by
#: ServerConnection.
STREAMS_PER_CONNECTION_MAX: Final = 1024

#: Largest revision msgpack can carry (uint64).
_REVISION_MAX: Final = 2**64 - 1

_MISSING: Final = object()


# -- field checks: raise BadRequest family, shared by both directions -------


def _check_int(value: object, field: str, lo: int, hi: int) -> None:
    # bool is an int subclass; True is not a request id.
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRequest(f"field {field!r} must be an integer")
    if not lo <= value <= hi:
        raise InvalidArgument(f"field {field!r} must be {lo}..{hi}")


def _check_str(value: object, field: str, chars_max: int, *, nonempty: bool = False) -> None:
    if not isinstance(value, str):
        raise BadRequest(f"field {field!r} must be a string")
    if len(value) > chars_max:
        raise InvalidArgument(f"field {field!r} is longer than {chars_max} characters")
    if nonempty and not value:
        raise InvalidArgument(f"field {field!r} must not be empty")


def check_request_fields(request_id: object, op: object, args: object) -> None:
    """Raise ``BadRequest`` (or a subclass) unless these are a valid request's id, op and args."""
    if type(request_id) is not int or not 0 <= request_id <= REQUEST_ID_MAX:
        _check_int(request_id, "id", 0, REQUEST_ID_MAX)
    if type(op) is not str or not 0 < len(op) <= OP_NAME_CHARS_MAX:
        _check_str(op, "op", OP_NAME_CHARS_MAX, nonempty=True)
    if not isinstance(args, dict):
        raise BadRequest("field 'args' must be a map")


def _check_error(value: object, field: str, *, optional: bool) -> None:
    if value is None and optional:
        return
    if not isinstance(value, RegistryError):
        raise BadRequest(f"field {field!r} must be a RegistryError")


# -- client -> server --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """First message of every connection."""

    version: int
    token: str | None
    client: str

    def __post_init__(self) -> None:
        _check_int(self.version, "v", 0, _REVISION_MAX)
        if self.token is not None:
            _check_str(self.token, "token", TOKEN_CHARS_MAX)
        _check_str(self.client, "client", CLIENT_NAME_CHARS_MAX)

    def to_wire(self) -> dict[str, Any]:
        return {"t": "hello", "v": self.version, "token": self.token, "client": self.client}


@dataclass(slots=True)
class Request:
    """One call; its ``id`` (chosen by the client) tags every reply to it.  Not frozen: see above."""

    id: int
    op: str
    args: dict[str, Any]

    def __post_init__(self) -> None:
        check_request_fields(self.id, self.op, self.args)

    def to_wire(self) -> dict[str, Any]:
        return {"t": "req", "id": self.id, "op": self.op, "args": self.args}


@dataclass(frozen=True, slots=True)
class Cancel:
    """Ask the server to stop request ``id``; it still ends with a final reply.

    Cancel races with completion, so an id that is no longer open is not an
    error: the server simply has nothing to stop.
    """

    id: int

    def __post_init__(self) -> None:
        _check_int(self.id, "id", 0, REQUEST_ID_MAX)

    def to_wire(self) -> dict[str, Any]:
        return {"t": "cancel", "id": self.id}


# -- server -> client --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HelloOk:
    """Handshake accepted; ``revision`` is the node's applied revision."""

    version: int
    node: str
    revision: int

    def __post_init__(self) -> None:
        _check_int(self.version, "v", 0, _REVISION_MAX)
        if not isinstance(self.node, str):
            raise BadRequest("field 'node' must be a string")
        _check_int(self.revision, "rev", 0, _REVISION_MAX)

    def to_wire(self) -> dict[str, Any]:
        return {"t": "hello_ok", "v": self.version, "node": self.node, "rev": self.revision}


@dataclass(slots=True)
class Response:
    """The final reply to a request: a body on success, else an error.

    Errors compare by identity (they are exceptions); compare ``to_wire()``
    to compare responses by value.
    """

    id: int
    revision: int
    body: Any = None
    error: RegistryError | None = None

    def __post_init__(self) -> None:
        if type(self.id) is not int or not 0 <= self.id <= REQUEST_ID_MAX:
            _check_int(self.id, "id", 0, REQUEST_ID_MAX)
        if type(self.revision) is not int or not 0 <= self.revision <= _REVISION_MAX:
            _check_int(self.revision, "rev", 0, _REVISION_MAX)
        if self.error is not None:
            _check_error(self.error, "err", optional=True)
            if self.body is not None:
                raise InvalidArgument("a response carries a body or an error, not both")

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"t": "res", "id": self.id, "rev": self.revision, "ok": self.error is None}
        if self.error is None:
            out["body"] = self.body
        else:
            out["err"] = error_to_wire(self.error)
        return out


@dataclass(slots=True)
class StreamEvent:
    """One item of a stream (e.g. a watch); the stream ends with ``StreamEnd``."""

    id: int
    body: Any

    def __post_init__(self) -> None:
        if type(self.id) is not int or not 0 <= self.id <= REQUEST_ID_MAX:
            _check_int(self.id, "id", 0, REQUEST_ID_MAX)

    def to_wire(self) -> dict[str, Any]:
        return {"t": "ev", "id": self.id, "body": self.body}


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """The final reply to a streaming request; ``error`` None means a clean end."""

    id: int
    error: RegistryError | None = None

    def __post_init__(self) -> None:
        _check_int(self.id, "id", 0, REQUEST_ID_MAX)
        _check_error(self.error, "err", optional=True)

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"t": "end", "id": self.id}
        if self.error is not None:
            out["err"] = error_to_wire(self.error)
        return out


@dataclass(frozen=True, slots=True)
class Bye:
    """Sent just before the server closes a connection whose byte stream broke."""

    error: RegistryError

    def __post_init__(self) -> None:
        _check_error(self.error, "err", optional=False)

    def to_wire(self) -> dict[str, Any]:
        return {"t": "bye", "err": error_to_wire(self.error)}


# -- server-side only --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BadMessage:
    """A well-framed but malformed client message; never sent.

    The server answers ``Response(id, revision, error=error)`` when ``id`` is
    known and keeps the connection open.  With ``id`` None there is no request
    to answer: log it and carry on.
    """

    id: int | None
    error: RegistryError


ClientMessage = Hello | Request | Cancel
ServerMessage = HelloOk | Response | StreamEvent | StreamEnd | Bye


# -- parsing -------------------------------------------------------------------


def _get(obj: dict[str, Any], key: str) -> Any:
    value = obj.get(key, _MISSING)
    if value is _MISSING:
        raise BadRequest(f"missing field {key!r}")
    return value


def _get_error(obj: dict[str, Any], key: str) -> RegistryError:
    value = _get(obj, key)
    if not isinstance(value, dict) or not isinstance(value.get("code"), str):
        raise BadRequest(f"field {key!r} must be an error map with a string 'code'")
    return error_from_wire(value)


def request_id_of(obj: dict[str, Any]) -> int | None:
    """The message's ``id`` if it is a valid request id, else None."""
    value = obj.get("id")
    try:
        _check_int(value, "id", 0, REQUEST_ID_MAX)
    except BadRequest:
        return None
    assert isinstance(value, int)
    return value


def parse_client_message(obj: dict[str, Any]) -> ClientMessage:
    """Turn a decoded frame from a client into an event; raise ``BadRequest`` if malformed."""
    t = obj.get("t")
    if t == "req":
        return Request(_get(obj, "id"), _get(obj, "op"), _get(obj, "args"))
    if t == "cancel":
        return Cancel(_get(obj, "id"))
    if t == "hello":
        return Hello(_get(obj, "v"), obj.get("token"), _get(obj, "client"))
    if not isinstance(t, str):
        raise BadRequest("field 't' (message type) must be a string")
    raise BadRequest(f"unknown message type {t[:OP_NAME_CHARS_MAX]!r}")


def _parse_server_message(obj: dict[str, Any]) -> ServerMessage:
    t = obj.get("t")
    if t == "res":
        ok = _get(obj, "ok")
        if not isinstance(ok, bool):
            raise BadRequest("field 'ok' must be a boolean")
        if ok:
            return Response(_get(obj, "id"), _get(obj, "rev"), body=obj.get("body"))
        return Response(_get(obj, "id"), _get(obj, "rev"), error=_get_error(obj, "err"))
    if t == "ev":
        return StreamEvent(_get(obj, "id"), obj.get("body"))
    if t == "end":
        return StreamEnd(_get(obj, "id"), _get_error(obj, "err") if obj.get("err") is not None else None)
    if t == "hello_ok":
        return HelloOk(_get(obj, "v"), _get(obj, "node"), _get(obj, "rev"))
    if t == "bye":
        return Bye(_get_error(obj, "err"))
    if not isinstance(t, str):
        raise BadRequest("field 't' (message type) must be a string")
    raise BadRequest(f"unknown message type {t[:OP_NAME_CHARS_MAX]!r}")


def parse_server_message(obj: dict[str, Any]) -> ServerMessage:
    """Turn a decoded frame from a server into an event; raise ``ProtocolError`` if malformed."""
    try:
        return _parse_server_message(obj)
    except BadRequest as exc:
        raise ProtocolError(f"malformed server message: {exc.message}") from None
