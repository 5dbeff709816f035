"""A lean keep-alive HTTP/1.1 client for etcd's v3 JSON gateway, for the benchmark driver only.

Why not aiohttp: at 256 requests in flight its client costs ~75% of a core here and caps etcd near
1.95k writes/s, which would flatter us in a side-by-side run.  This client does only what the
gateway needs: POST with a JSON body, persistent connections, one request at a time per
connection (no pipelining), responses framed by Content-Length or chunked transfer encoding (the
gateway streams watch and lease-keepalive responses chunked).  It is not a general HTTP client:
no redirects, no compression, no TLS, no trailers kept; it talks to a server we started.

``ResponseParser`` is sans-IO (bytes in, events out) so it is unit-tested without sockets;
``HttpConnection`` is the thin asyncio-streams shell around it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

__all__ = ["Body", "End", "Head", "HttpConnection", "HttpError", "ResponseParser"]

#: Bounds: the gateway's heads are ~300 bytes; a peer sending more is broken, not slow.
MAX_HEAD = 64 * 1024
MAX_CHUNK_LINE = 1024


class HttpError(Exception):
    """A malformed or unexpected response, or the connection closed mid-response."""


@dataclass(frozen=True)
class Head:
    status: int
    #: Lower-cased names; a repeated header keeps its last value (the gateway repeats none we read).
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Body:
    data: bytes


@dataclass(frozen=True)
class End:
    #: The server said ``Connection: close`` or framed the body by closing: do not reuse the connection.
    close: bool = False


Event = Head | Body | End

_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILER, _UNTIL_CLOSE, _DONE = range(8)


class ResponseParser:
    """Incremental parser for a sequence of HTTP/1.1 responses on one connection.

    ``feed(data)`` returns the events completed by ``data``: a ``Head``, zero or more ``Body``
    pieces, then ``End``; then the next response's events.  ``feed_eof()`` ends a body framed by the
    connection's close, or raises if a response was cut short.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._state = _HEAD
        self._remaining = 0
        self._close = False

    def feed(self, data: bytes) -> list[Event]:
        if self._state == _DONE:
            raise HttpError("data after the connection was closed by the response")
        self._buf += data
        out: list[Event] = []
        while self._step(out):
            pass
        return out

    def feed_eof(self) -> list[Event]:
        if self._state == _UNTIL_CLOSE:
            self._state = _DONE
            return [End(close=True)]
        if self._state == _DONE or (self._state == _HEAD and not self._buf):
            return []  # between responses, or after one that said it would close
        raise HttpError("connection closed in the middle of a response")

    # One transition; False when it needs more bytes.
    def _step(self, out: list[Event]) -> bool:
        buf = self._buf
        state = self._state
        if state == _HEAD:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    raise HttpError("response head too large")
                return False
            head = bytes(buf[:end])
            del buf[: end + 4]
            self._start(head, out)
            return True
        if state == _LENGTH:
            if not buf:
                return False
            if self._take_body(out):
                self._finish(out)
            return True
        if state == _CHUNK_SIZE:
            raw = self._line(MAX_CHUNK_LINE, "chunk size line")
            if raw is None:
                return False
            line = raw.split(b";", 1)[0].strip()  # chunk extensions are ignored
            try:
                size = int(line, 16)
            except ValueError:
                raise HttpError(f"bad chunk size {line!r}") from None
            if size < 0:
                raise HttpError(f"bad chunk size {line!r}")
            self._remaining = size
            self._state = _CHUNK_DATA if size else _TRAILER
            return True
        if state == _CHUNK_DATA:
            if not buf:
                return False
            if self._take_body(out):
                self._state = _CHUNK_CRLF
            return True
        if state == _CHUNK_CRLF:
            if len(buf) < 2:
                return False
            if buf[:2] != b"\r\n":
                raise HttpError("chunk not followed by CRLF")
            del buf[:2]
            self._state = _CHUNK_SIZE
            return True
        if state == _TRAILER:
            raw = self._line(MAX_HEAD, "trailer line")
            if raw is None:
                return False
            if not raw:  # the empty line that ends the trailer section
                self._finish(out)
            return True
        if state == _UNTIL_CLOSE:
            if buf:
                out.append(Body(bytes(buf)))
                buf.clear()
            return False
        if buf:
            raise HttpError("data after the connection was closed by the response")
        return False

    def _line(self, limit: int, what: str) -> bytes | None:
        """Take one CRLF-terminated line (without the CRLF) off the buffer; None until it is complete."""
        eol = self._buf.find(b"\r\n")
        if eol < 0:
            if len(self._buf) > limit:
                raise HttpError(f"{what} too long")
            return None
        line = bytes(self._buf[:eol])
        del self._buf[: eol + 2]
        return line

    def _take_body(self, out: list[Event]) -> bool:
        """Hand out what the buffer holds of the ``_remaining`` body bytes; True once they are all out."""
        take = min(self._remaining, len(self._buf))
        out.append(Body(bytes(self._buf[:take])))
        del self._buf[:take]
        self._remaining -= take
        return self._remaining == 0

    def _start(self, head: bytes, out: list[Event]) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit() or len(parts[1]) != 3:
            raise HttpError(f"bad status line {lines[0][:80]!r}")
        status = int(parts[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip():
                raise HttpError(f"bad header line {line[:80]!r}")
            headers[name.decode("latin-1").lower()] = value.strip().decode("latin-1")
        if 100 <= status < 200:
            return  # interim response (100 Continue): the real one follows
        version_close = parts[0] == b"HTTP/1.0" and headers.get("connection", "").lower() != "keep-alive"
        self._close = version_close or "close" in headers.get("connection", "").lower()
        out.append(Head(status, headers))
        if status in (204, 304):
            self._finish(out)
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            self._state = _CHUNK_SIZE
        elif "content-length" in headers:
            text = headers["content-length"]
            if not text.isdigit():
                raise HttpError(f"bad Content-Length {text!r}")
            self._remaining = int(text)
            self._state = _LENGTH
            if self._remaining == 0:
                self._finish(out)
        else:
            self._state = _UNTIL_CLOSE

    def _finish(self, out: list[Event]) -> None:
        out.append(End(close=self._close))
        self._state = _DONE if self._close else _HEAD
        self._close = False


class HttpConnection:
    """One persistent connection; ``post`` and ``post_stream`` must not overlap on it."""

    def __init__(self, host: str, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.host, self.port = host, port
        self._reader, self._writer = reader, writer
        self._parser = ResponseParser()
        self._pending: list[Event] = []
        self._prefix = f"Host: {host}:{port}\r\nContent-Type: application/json\r\nContent-Length: ".encode()
        self.closed = False

    @classmethod
    async def open(cls, endpoint: str) -> HttpConnection:
        host, _, port = endpoint.rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        return cls(host, int(port), reader, writer)

    def _send(self, path: str, body: bytes) -> None:
        if self.closed:
            raise HttpError("connection closed")
        self._writer.write(b"POST " + path.encode() + b" HTTP/1.1\r\n" + self._prefix + str(len(body)).encode()
                           + b"\r\n\r\n" + body)

    async def _next(self) -> Event:
        while not self._pending:
            data = await self._reader.read(256 * 1024)
            if not data:
                self._pending = self._parser.feed_eof()
                if not self._pending:
                    self.closed = True
                    raise HttpError("connection closed by the server")
            else:
                self._pending = self._parser.feed(data)
            self._pending.reverse()  # pop() from the end in arrival order
        return self._pending.pop()

    async def _request(self, path: str, body: bytes) -> Head:
        """Send a request and read its response head."""
        self._send(path, body)
        head = await self._next()
        if not isinstance(head, Head):
            raise HttpError(f"expected a response head, got {head!r}")
        return head

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        """Send one request; return (status, whole body)."""
        head = await self._request(path, body)
        parts: list[bytes] = []
        while True:
            event = await self._next()
            if isinstance(event, Body):
                parts.append(event.data)
            elif isinstance(event, End):
                if event.close:
                    await self.close()
                return head.status, parts[0] if len(parts) == 1 else b"".join(parts)
            else:
                raise HttpError("a new response began before the body ended")

    async def post_stream(self, path: str, body: bytes) -> AsyncIterator[bytes]:
        """Send one request; yield the response body line by line (newline-delimited JSON) as it arrives.

        Raises ``HttpError`` for a status other than 200 (with the body's start in the message).
        """
        head = await self._request(path, body)
        pending = b""
        while True:
            event = await self._next()
            if isinstance(event, End):
                if head.status != 200:
                    raise HttpError(f"HTTP {head.status}: {pending[:200]!r}")
                if pending.strip():
                    yield pending
                if event.close:
                    await self.close()
                return
            if not isinstance(event, Body):
                raise HttpError("a new response began before the body ended")
            pending += event.data
            if head.status != 200:
                continue
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line.strip():
                    yield line

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (ConnectionError, OSError):
            pass
