"""pysyncobj's TCP transport with Raft messages sent as stored zlib streams."""

from __future__ import annotations

import struct
import zlib
from typing import Any

from pysyncobj import pickle as raft_pickle
from pysyncobj.monotonic import monotonic as raft_clock
from pysyncobj.tcp_connection import CONNECTION_STATE
from pysyncobj.transport import TCPTransport

__all__ = ["RaftTransport", "zlib_stored"]

#: Largest payload of one stored deflate block (its length field is 16 bits).
_STORED_BLOCK_BYTES_MAX = 0xFFFF
_STORED_BLOCK_HEAD = struct.Struct("<BHH")
#: zlib header: deflate, 32 KiB window, no dictionary, "fastest" level; (0x78 << 8 | 0x01) % 31 == 0.
_ZLIB_HEAD = b"\x78\x01"


def zlib_stored(data: bytes) -> bytes:
    """``data`` as a zlib stream of stored (uncompressed) deflate blocks: what ``zlib.decompress`` reads back.

    pysyncobj zlib-compresses every message it sends at level 3, and each
    ``zlib.compress`` call sets up a fresh deflate state: ~50 us for a
    500-byte message here, more than pickling, encrypting and sending it.
    Raft traffic is loopback or LAN and mostly small or already-dense
    msgpack, so it is sent stored instead (~1 us); the receiver's
    ``zlib.decompress`` is unchanged and just copies, so stock pysyncobj
    peers read it too.
    """
    parts: list[bytes | memoryview] = [_ZLIB_HEAD]
    size = len(data)
    view = memoryview(data)
    start = 0
    while True:
        end = min(start + _STORED_BLOCK_BYTES_MAX, size)
        length = end - start
        parts.append(_STORED_BLOCK_HEAD.pack(1 if end == size else 0, length, length ^ 0xFFFF))
        parts.append(view[start:end])
        if end == size:
            break
        start = end
    parts.append(zlib.adler32(data).to_bytes(4, "big"))
    return b"".join(parts)


class RaftTransport(TCPTransport):  # type: ignore[misc]
    """pysyncobj's TCP transport, with every Raft message sent as a stored zlib stream (``zlib_stored``).

    The same framing as ``TcpConnection.send`` (random key, pickle, zlib,
    encryptor, 4-byte length) without the compression; the connection
    handshake still goes through pysyncobj's own ``send``.
    """

    def send(self, node: Any, message: Any) -> bool:
        conn = self._connections.get(node)
        if conn is None or conn.state != CONNECTION_STATE.CONNECTED:
            return False
        if conn.encryptor is None:  # every RaftNode sets one; keep pysyncobj's path otherwise
            return bool(super().send(node, message))
        if conn.sendRandKey:
            message = (conn.sendRandKey, message)
        data = conn.encryptor.encrypt_at_time(zlib_stored(raft_pickle.dumps(message)), int(raft_clock()))
        conn._TcpConnection__writeBuffer += struct.pack("i", len(data)) + data
        conn._TcpConnection__trySendBuffer()
        return bool(conn.state == CONNECTION_STATE.CONNECTED)
