"""pysyncobj's TCP transport: Raft messages sent as stored zlib streams, over guarded sockets (``tcp.py``)."""

from __future__ import annotations

import functools
import ipaddress
import struct
import zlib
from typing import Any

from pysyncobj import pickle as raft_pickle
from pysyncobj.dns_resolver import globalDnsResolver
from pysyncobj.monotonic import monotonic as raft_clock
from pysyncobj.tcp_connection import CONNECTION_STATE
from pysyncobj.transport import TCPTransport

from registry.config import RaftWireLimits, parse_hostport
from registry.raft.tcp import GuardedTcpConnection, GuardedTcpServer, WireCounters

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

    Receiving and accepting go through ``tcp.py``'s guarded listener and
    connections, and the listener binds exactly the host of this node's Raft
    address (pysyncobj bound 0.0.0.0 for any address; ``SyncObjConf.bindAddress``,
    if set, is bound instead).
    """

    def __init__(self, syncObj: Any, selfNode: Any, otherNodes: Any) -> None:
        # Set before TCPTransport.__init__, which creates the listener and the outgoing connections.
        # pysyncobj builds the transport itself, so the node's limits (NodeConfig.raft_wire) come
        # through the node; the defaults when it has none (a bare SyncObj in a test).
        limits = getattr(syncObj, "wire_limits", None)
        self.wire_limits = limits if isinstance(limits, RaftWireLimits) else RaftWireLimits()
        self.wire_counters = WireCounters()
        super().__init__(syncObj, selfNode, otherNodes)

    def _guarded_connection(self, **kwargs: Any) -> GuardedTcpConnection:
        return GuardedTcpConnection(limits=self.wire_limits, counters=self.wire_counters, **kwargs)

    def _createServer(self) -> None:
        conf = self._syncObj.conf
        host, port = parse_hostport(conf.bindAddress or self._selfNode.address, what="raft bind address")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            resolved = globalDnsResolver().resolve(host)
            if resolved is None:
                raise RuntimeError(f"cannot resolve the raft bind host {host!r}") from None
            host = resolved
        self._server = GuardedTcpServer(
            self._syncObj._poller, host, port, self._onNewIncomingConnection,
            limits=self.wire_limits, counters=self.wire_counters, connection_factory=self._guarded_connection,
            sendBufferSize=conf.sendBufferSize, recvBufferSize=conf.recvBufferSize,
            connectionTimeout=conf.connectionTimeout)

    def addNode(self, node: Any) -> None:
        super().addNode(node)
        conn = self._connections.get(node)
        if conn is None or isinstance(conn, GuardedTcpConnection):
            return
        # pysyncobj just made a plain connection to dial this node (not yet connected, so not polled).
        conf = self._syncObj.conf
        guarded = self._guarded_connection(poller=self._syncObj._poller, timeout=conf.connectionTimeout,
                                           sendBufferSize=conf.sendBufferSize, recvBufferSize=conf.recvBufferSize,
                                           keepalive=conf.tcp_keepalive)
        guarded.encryptor = conn.encryptor
        guarded.setOnConnectedCallback(functools.partial(self._onOutgoingConnected, guarded))
        guarded.setOnMessageReceivedCallback(functools.partial(self._onMessageReceived, node))
        guarded.setOnDisconnectedCallback(functools.partial(self._onDisconnected, guarded))
        self._connections[node] = guarded

    def _onTick(self) -> None:
        super()._onTick()
        if isinstance(self._server, GuardedTcpServer):
            self._server.sweep()

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
