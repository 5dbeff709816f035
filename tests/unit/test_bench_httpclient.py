"""The benchmark's HTTP/1.1 response parser (bench/httpclient.py), bytes in, events out: no sockets."""

from __future__ import annotations

import pytest

from bench.httpclient import Body, End, Head, HttpError, ResponseParser

OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"


def _summarize(events: list[object]) -> list[tuple[object, ...]]:
    """Events as comparable tuples, with adjacent body pieces joined (how bytes are split must not matter)."""
    out: list[tuple[object, ...]] = []
    for event in events:
        if isinstance(event, Head):
            out.append(("head", event.status))
        elif isinstance(event, Body):
            if out and out[-1][0] == "body":
                out[-1] = ("body", bytes(out[-1][1]) + event.data)  # type: ignore[arg-type]
            else:
                out.append(("body", event.data))
        elif isinstance(event, End):
            out.append(("end", event.close))
    return out


# (name, wire bytes, expected events after feeding everything and then EOF)
CASES: list[tuple[str, bytes, list[tuple[object, ...]]]] = [
    ("content-length", OK_HEAD + b"Content-Length: 2\r\n\r\n{}",
     [("head", 200), ("body", b"{}"), ("end", False)]),
    ("empty body", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", [("head", 200), ("end", False)]),
    ("no content status", b"HTTP/1.1 204 No Content\r\n\r\n", [("head", 204), ("end", False)]),
    ("two responses back to back",
     OK_HEAD + b"Content-Length: 1\r\n\r\nA" + OK_HEAD + b"Content-Length: 1\r\n\r\nB",
     [("head", 200), ("body", b"A"), ("end", False), ("head", 200), ("body", b"B"), ("end", False)]),
    ("chunked, two chunks", OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nA\r\n0123456789\r\n0\r\n\r\n",
     [("head", 200), ("body", b"abc0123456789"), ("end", False)]),
    ("chunked, extension and trailer",
     OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n2;x=y\r\nhi\r\n0\r\nX-Trailer: 1\r\n\r\n",
     [("head", 200), ("body", b"hi"), ("end", False)]),
    ("header names are case-insensitive", b"HTTP/1.1 200 OK\r\ncontent-LENGTH: 3\r\n\r\nabc",
     [("head", 200), ("body", b"abc"), ("end", False)]),
    ("connection close", b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx",
     [("head", 200), ("body", b"x"), ("end", True)]),
    ("body until close", b"HTTP/1.1 200 OK\r\n\r\nall of it", [("head", 200), ("body", b"all of it"), ("end", True)]),
    ("HTTP/1.0 closes by default", b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx",
     [("head", 200), ("body", b"x"), ("end", True)]),
    ("interim 100 Continue is skipped", b"HTTP/1.1 100 Continue\r\n\r\n" + OK_HEAD + b"Content-Length: 1\r\n\r\nz",
     [("head", 200), ("body", b"z"), ("end", False)]),
    ("error status keeps its body", b"HTTP/1.1 400 Bad Request\r\nContent-Length: 5\r\n\r\nerror",
     [("head", 400), ("body", b"error"), ("end", False)]),
]


@pytest.mark.parametrize(("wire", "expected"), [(w, e) for _, w, e in CASES], ids=[n for n, _, _ in CASES])
def test_whole_input(wire: bytes, expected: list[tuple[object, ...]]) -> None:
    parser = ResponseParser()
    assert _summarize([*parser.feed(wire), *parser.feed_eof()]) == expected


@pytest.mark.parametrize(("wire", "expected"), [(w, e) for _, w, e in CASES], ids=[n for n, _, _ in CASES])
def test_byte_at_a_time(wire: bytes, expected: list[tuple[object, ...]]) -> None:
    """Every split point: the socket may hand over any prefix."""
    parser = ResponseParser()
    events: list[object] = []
    for i in range(len(wire)):
        events += parser.feed(wire[i : i + 1])
    events += parser.feed_eof()
    assert _summarize(events) == expected


def test_head_fields() -> None:
    (head, *_rest) = ResponseParser().feed(OK_HEAD + b"X-Thing:  spaced value \r\nContent-Length: 0\r\n\r\n")
    assert isinstance(head, Head)
    assert head.headers["x-thing"] == "spaced value"
    assert head.headers["content-type"] == "application/json"


def test_stream_events_arrive_before_the_end() -> None:
    """A watch stream: each chunk is handed out as soon as it is complete, long before the final chunk."""
    parser = ResponseParser()
    first = parser.feed(OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nline\n\r\n")
    assert _summarize(first) == [("head", 200), ("body", b"line\n")]
    assert _summarize(parser.feed(b"3\r\nab\n\r\n")) == [("body", b"ab\n")]


BAD: list[tuple[str, bytes]] = [
    ("not http", b"SSH-2.0-OpenSSH\r\n\r\n"),
    ("status not a number", b"HTTP/1.1 2xx OK\r\n\r\n"),
    ("header without colon", b"HTTP/1.1 200 OK\r\nContent-Length 5\r\n\r\n"),
    ("space before colon", b"HTTP/1.1 200 OK\r\nContent-Length : 5\r\n\r\n"),
    ("bad content-length", b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n"),
    ("bad chunk size", OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n"),
    ("chunk without CRLF", OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n1\r\naXX"),
    ("head too large", b"HTTP/1.1 200 OK\r\n" + b"X: " + b"y" * 70_000),
    ("data after a closing response", b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\nextra"),
]


@pytest.mark.parametrize("wire", [w for _, w in BAD], ids=[n for n, _ in BAD])
def test_malformed_input_raises(wire: bytes) -> None:
    with pytest.raises(HttpError):
        ResponseParser().feed(wire)


@pytest.mark.parametrize("wire", [OK_HEAD + b"Content-Length: 5\r\n\r\nab", OK_HEAD,
                                  OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nab"],
                         ids=["short body", "head only", "short chunk"])
def test_eof_mid_response_raises(wire: bytes) -> None:
    parser = ResponseParser()
    parser.feed(wire)
    with pytest.raises(HttpError):
        parser.feed_eof()


def test_eof_between_responses_is_clean() -> None:
    parser = ResponseParser()
    parser.feed(OK_HEAD + b"Content-Length: 0\r\n\r\n")
    assert parser.feed_eof() == []
