"""Recognising what answered when the client was pointed at something other than an API port."""

from __future__ import annotations

import msgpack
import pytest

from registry.client.wrong_port import SILENT, what_answered, wrong_port_message
from registry.protocol import PROTOCOL_VERSION, ClientConnection, Hello, HelloOk, ServerConnection


def hello_ok_bytes() -> bytes:
    """What a node really sends first: its hello_ok frame, after a client's hello."""
    client, server = ClientConnection(), ServerConnection()
    server.receive_data(client.send(Hello(version=PROTOCOL_VERSION, token=None, client="t")))
    assert isinstance(server.next_event(), Hello)
    return server.send(HelloOk(version=PROTOCOL_VERSION, node="n1", revision=5))


@pytest.mark.parametrize(
    ("first_bytes", "answered"),
    [
        (b"HTTP/1.0 400 Bad Request\r\n", "HTTP"),
        (b"HTTP/1.1 400", "HTTP"),
        (b"SSH-2.0-OpenSSH_9.6\r\n", "SSH"),
        (bytes([21, 3, 3, 0, 2, 2, 80]), "TLS"),  # a TLS alert record
        (bytes([22, 3, 1, 0, 90]), "TLS"),  # a TLS handshake record
        (b"", SILENT),  # closed without a byte: what a Raft port does with our hello
        # Too few bytes to tell: left to the frame decoder.
        (b"HTT", None),
        (b"\x00", None),
        # Our own protocol is never mistaken for another.
        (msgpack.packb({"x": 1}), None),
    ],
)
def test_what_answered(first_bytes: bytes, answered: str | None) -> None:
    assert what_answered(first_bytes) == answered


def test_a_real_hello_ok_is_ours() -> None:
    data = hello_ok_bytes()
    for end in range(1, len(data) + 1):
        assert what_answered(data[:end]) is None


@pytest.mark.parametrize(
    ("answered", "says"),
    [
        ("HTTP", "127.0.0.1:7201 answered HTTP: that is a node's HTTP port"),
        ("TLS", "pass --tls-ca"),
        (SILENT, "a node's Raft port does that"),
        ("SSH", "127.0.0.1:7201 answered SSH: not a registry API port"),
    ],
)
def test_messages_are_one_line_and_name_the_api_ports(answered: str, says: str) -> None:
    message = wrong_port_message("127.0.0.1:7201", answered)
    assert says in message and "\n" not in message
    if answered != "TLS":
        assert "--api" in message
