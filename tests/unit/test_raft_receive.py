"""The Raft receiver over a real socket pair (registry/raft/tcp.py, issue #20 findings 1 and 10).

Frames are made as a peer makes them (pickle, zlib, ``RaftCipher`` under the
cluster key, a 4-byte length) and written into one end of a socket pair; the
other end is a ``GuardedTcpConnection``.  The poller below only records what
the connection subscribes, so the test runs the connection's read handler
itself, exactly when it chooses.
"""

from __future__ import annotations

import pickle
import socket
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from registry.raft.cipher import RaftCipher
from registry.raft.tcp import GuardedTcpConnection, RaftWireLimits, WireCounters

KEY = "test-cluster-key-0123456789"
#: pysyncobj's POLL_EVENT_TYPE.READ.
READ = 1


class RecordingPoller:
    """Holds the handler each descriptor subscribed; the test calls it."""

    def __init__(self) -> None:
        self.handlers: dict[int, Callable[[int, int], None]] = {}

    def subscribe(self, descr: int, callback: Callable[[int, int], None], event_mask: int) -> None:
        self.handlers[descr] = callback

    def unsubscribe(self, descr: int) -> None:
        self.handlers.pop(descr, None)


@dataclass
class Receiver:
    conn: GuardedTcpConnection
    sock: socket.socket
    poller: RecordingPoller
    received: list[Any] = field(default_factory=list)
    closed: list[bool] = field(default_factory=list)

    def pump(self) -> None:
        fileno = self.sock.fileno()
        handler = self.poller.handlers.get(fileno)
        if handler is not None:
            handler(fileno, READ)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, Receiver]]:
    peer, mine = socket.socketpair()
    mine.setblocking(False)
    poller = RecordingPoller()
    conn = GuardedTcpConnection(poller=poller, socket=mine, timeout=30.0, limits=RaftWireLimits(),
                                counters=WireCounters())
    conn.encryptor = RaftCipher(KEY, "127.0.0.1:7102", "b" * 32)
    receiver = Receiver(conn, mine, poller)
    conn.setOnMessageReceivedCallback(receiver.received.append)
    conn.setOnDisconnectedCallback(lambda: receiver.closed.append(True))
    try:
        yield peer, receiver
    finally:
        conn.disconnect()
        mine.close()
        peer.close()


def frame(cipher: RaftCipher, obj: Any) -> bytes:
    token = cipher.encrypt_at_time(zlib.compress(pickle.dumps(obj)), int(time.monotonic()))
    return struct.pack("i", len(token)) + token


def sender() -> RaftCipher:
    return RaftCipher(KEY, "127.0.0.1:7101", "a" * 32)


@pytest.mark.parametrize(
    ("order", "delivered", "closed"),
    [
        ([0, 1, 2], ["m0", "m1", "m2"], False),
        ([0, 1, 0], ["m0", "m1"], True),  # a replay, within the same second (pysyncobj accepted it)
        ([0, 0], ["m0"], True),
        ([1, 0], ["m1"], True),  # reordered
        ([0, 2], ["m0", "m2"], False),  # a gap is fine: the sender's other connections took the counters between
    ],
)
def test_counters_must_grow_on_a_connection(pair: tuple[socket.socket, Receiver], order: list[int],
                                            delivered: list[str], closed: bool) -> None:
    peer, receiver = pair
    cipher = sender()
    frames = [frame(cipher, f"m{i}") for i in range(3)]
    peer.sendall(b"".join(frames[i] for i in order))
    receiver.pump()
    assert receiver.received == delivered
    assert bool(receiver.closed) is closed


def test_another_sender_process_on_the_same_connection_is_refused(pair: tuple[socket.socket, Receiver]) -> None:
    peer, receiver = pair
    peer.sendall(frame(sender(), "first") + frame(sender(), "spliced"))
    receiver.pump()
    assert receiver.received == ["first"] and receiver.closed


@pytest.mark.parametrize(
    "prefix",
    [
        struct.pack("i", (1 << 31) - 1),  # 2 GiB from a stranger
        struct.pack("i", RaftWireLimits().handshake_message_bytes_max + 1),  # over the pre-authentication limit
        struct.pack("i", -5),
    ],
)
def test_oversized_or_negative_lengths_close_the_connection_at_once(pair: tuple[socket.socket, Receiver],
                                                                    prefix: bytes) -> None:
    peer, receiver = pair
    peer.sendall(prefix + b"\0" * 1000)
    receiver.pump()
    assert receiver.closed and receiver.received == []


def test_a_frame_that_does_not_authenticate_closes_the_connection(pair: tuple[socket.socket, Receiver]) -> None:
    peer, receiver = pair
    other_key = RaftCipher("another-cluster-key-000000", "127.0.0.1:7101", "a" * 32)
    peer.sendall(frame(other_key, "forged"))
    receiver.pump()
    assert receiver.closed and receiver.received == []


def test_a_frame_split_across_reads_is_reassembled(pair: tuple[socket.socket, Receiver]) -> None:
    peer, receiver = pair
    data = frame(sender(), "x" * 3000)
    for i in range(0, len(data), 700):
        peer.sendall(data[i : i + 700])
        receiver.pump()
    assert receiver.received == ["x" * 3000] and not receiver.closed
