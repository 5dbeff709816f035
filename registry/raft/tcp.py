"""pysyncobj's TCP listener and connections, with limits an attacker on the network cannot get around.

Theory of operation
-------------------
pysyncobj's ``TcpServer`` and ``TcpConnection`` trust whoever connects:

- a frame is a signed 4-byte length and that many bytes, and the receiver
  buffers until the whole frame is there, whatever the length says (2 GiB
  from a stranger is read into memory before the cipher sees a byte);
- each read is appended to a ``bytes`` buffer, a full copy per 64 KiB read:
  quadratic, so one large frame kept the Raft thread copying for seconds
  while heartbeats stopped and followers started elections;
- a connection that never sends anything, or drips a byte at a time, is
  never closed (the idle timeout is reset by every read);
- an ``accept`` error other than EAGAIN (EMFILE once the process is out of
  file descriptors) unbinds the listener for good: a peer that restarts can
  no longer reach the node.

``GuardedTcpServer`` and ``GuardedTcpConnection`` replace those parts and
keep pysyncobj's callbacks and framing, so peers running the same version
see no difference.  ``RaftWireLimits`` holds every bound, each with its unit.
A connection is *authenticated* once one message from it has passed the
cipher (AES-GCM under the cluster key, ``cipher.py``); before that its frames
may be at most ``handshake_message_bytes_max`` (the first messages are a
32-byte key and an address), it must authenticate within
``handshake_deadline_s``, and at most ``unauthenticated_connections_max``
such connections are kept (the oldest goes first).  After that a frame may be
at most ``message_bytes_max``.  In ``--dev`` the cluster key is public, so
"authenticated" proves nothing: that is why ``--dev`` is loopback-only.

The pure rules (``frame_length``, ``accept_error_action``) do no I/O and are
table-tested; the classes are the thin I/O around them.  They reach into
pysyncobj's name-mangled attributes, so this module asserts the one
pysyncobj version it was written against.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import struct
import zlib
from collections.abc import Callable
from typing import Any

from pysyncobj import pickle as raft_pickle
from pysyncobj.monotonic import monotonic as raft_clock
from pysyncobj.poller import POLL_EVENT_TYPE
from pysyncobj.tcp_connection import CONNECTION_STATE, TcpConnection
from pysyncobj.tcp_server import TcpServer
from pysyncobj.version import VERSION as PYSYNCOBJ_VERSION

from registry.config import RaftWireLimits

__all__ = ["RaftWireLimits", "FrameRefused", "frame_length", "accept_error_action", "GuardedTcpConnection",
           "GuardedTcpServer", "WireCounters"]

# Every override below names a private of this exact pysyncobj release.
assert PYSYNCOBJ_VERSION == "0.3.17", f"registry/raft/tcp.py patches pysyncobj 0.3.17, found {PYSYNCOBJ_VERSION}"

log = logging.getLogger("registry.raft.tcp")

#: pysyncobj's frame prefix: a native signed 32-bit length (``struct.pack('i', ...)``).
_PREFIX = struct.Struct("i")


class FrameRefused(Exception):
    """A frame (or its length prefix) that this connection must not accept; the connection is closed."""


def frame_length(buffer: bytes | bytearray, *, authenticated: bool, limits: RaftWireLimits) -> int | None:
    """The length of the frame at the start of ``buffer``; None until its 4-byte prefix has arrived.

    Raises ``FrameRefused`` for a negative length or one over the limit for
    the connection's stage, as soon as the prefix is in: nothing more of
    such a frame is ever buffered.
    """
    if len(buffer) < _PREFIX.size:
        return None
    (length,) = _PREFIX.unpack_from(buffer)
    if length < 0:
        raise FrameRefused(f"negative frame length {length}")
    cap = limits.message_bytes_max if authenticated else limits.handshake_message_bytes_max
    if length > cap:
        stage = "message_bytes_max" if authenticated else "handshake_message_bytes_max"
        raise FrameRefused(f"frame of {length} bytes over {stage} ({cap})")
    return int(length)


#: What to do after a failed ``accept``: nothing (try again on the next event) or pause the listener.
ACCEPT_RETRY = "retry"
ACCEPT_PAUSE = "pause"
#: Out of a resource: the listener stays readable, so retrying at once would spin.
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def accept_error_action(code: int | None) -> str:
    """Whether a failed ``accept`` pauses the listener; it never closes it (pysyncobj did, for good)."""
    return ACCEPT_PAUSE if code in _RESOURCE_ERRNOS else ACCEPT_RETRY


class WireCounters:
    """What the guards refused, for metrics and logs (mutated only in the Raft thread)."""

    def __init__(self) -> None:
        self.frames_refused = 0
        self.messages_refused = 0
        self.handshakes_expired = 0
        self.handshakes_evicted = 0
        self.accept_errors = 0


class _LogLimiter:
    """At most one warning per ``period_s`` per kind, with a count of those suppressed meanwhile."""

    def __init__(self, period_s: float = 10.0) -> None:
        self._period_s = period_s
        self._next: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warn(self, kind: str, text: str, *args: object) -> None:
        now = raft_clock()
        if now < self._next.get(kind, 0.0):
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._next[kind] = now + self._period_s
        suppressed = self._suppressed.pop(kind, 0)
        if suppressed:
            text += f" ({suppressed} more like it since the last warning)"
        log.warning(text, *args)


_warn = _LogLimiter()


class GuardedTcpConnection(TcpConnection):  # type: ignore[misc]
    """pysyncobj's connection with bounded frames, linear-time buffering and a handshake deadline.

    Overrides ``__processRead``, ``__tryReadBuffer``, ``__processParseMessage``
    and ``__processConnectionTimeout`` of ``TcpConnection`` (by their mangled
    names, which is how pysyncobj's own calls reach them).  The read buffer
    is a ``bytearray``: appending is amortized O(1) and CPython drops a
    consumed prefix by moving its start, so a frame costs linear time.
    """

    # pysyncobj's attributes that this class assigns.
    _TcpConnection__readBuffer: bytes | bytearray
    recvLastTimestamp: int

    def __init__(self, *args: Any, limits: RaftWireLimits, counters: WireCounters, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._limits = limits
        self._counters = counters
        #: Set once a message from this connection passed the cipher (see the module docstring).
        self.authenticated = False
        #: When the connection was accepted or last dialed: its handshake deadline counts from here.
        self.opened_at = raft_clock()
        #: (sender process salt, counter) of the last message opened here: counters must grow.
        self._last_sequence: tuple[bytes, int] | None = None
        self._read_this_event = 0
        self._peer = "?"
        self._remember_peer()

    def _remember_peer(self) -> None:
        sock = self._TcpConnection__socket
        if sock is not None:
            with contextlib.suppress(OSError):
                peer = sock.getpeername()
                if isinstance(peer, tuple) and len(peer) >= 2:
                    self._peer = f"{peer[0]}:{peer[1]}"

    def connect(self, host: str, port: int) -> bool:
        self.authenticated = False
        self._last_sequence = None
        self.opened_at = raft_clock()
        self._peer = f"{host}:{port}"
        return bool(super().connect(host, port))

    def disconnect(self) -> None:
        self.authenticated = False
        self._last_sequence = None
        super().disconnect()

    @property
    def handshake_expired(self) -> bool:
        return not self.authenticated and raft_clock() - self.opened_at > self._limits.handshake_deadline_s

    def _read_buffer(self) -> bytearray:
        buffer = self._TcpConnection__readBuffer
        if not isinstance(buffer, bytearray):
            # pysyncobj resets it to bytes() in connect() and disconnect().
            buffer = bytearray(buffer)
            self._TcpConnection__readBuffer = buffer
        return buffer

    def _refuse(self, kind: str, err: Exception) -> None:
        _warn.warn(kind, "raft connection from %s closed: %s", self._peer, err)
        self.disconnect()

    def _TcpConnection__processConnectionTimeout(self) -> None:
        if self.handshake_expired and self.state != CONNECTION_STATE.DISCONNECTED:
            self._counters.handshakes_expired += 1
            _warn.warn("handshake", "raft connection from %s closed: no authenticated message within %.1f s",
                       self._peer, self._limits.handshake_deadline_s)
            self.disconnect()
            return
        TcpConnection._TcpConnection__processConnectionTimeout(self)

    def _TcpConnection__tryReadBuffer(self) -> None:
        self._read_this_event = 0
        while self._TcpConnection__processRead():
            pass
        self._TcpConnection__lastReadTime = raft_clock()

    def _TcpConnection__processRead(self) -> bool:
        sock = self._TcpConnection__socket
        if sock is None:
            return False
        try:
            incoming = sock.recv(self._TcpConnection__recvBufferSize)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                self.disconnect()
            return False
        if not incoming:
            self.disconnect()
            return False
        buffer = self._read_buffer()
        buffer += incoming
        try:
            # Refuse an oversized frame as soon as its prefix is in, not once it has all arrived.
            frame_length(buffer, authenticated=self.authenticated, limits=self._limits)
        except FrameRefused as err:
            self._counters.frames_refused += 1
            self._refuse("frame", err)
            return False
        self._read_this_event += len(incoming)
        budget = (self._limits.read_bytes_per_event_max if self.authenticated
                  else self._limits.handshake_message_bytes_max + _PREFIX.size)
        return self._read_this_event < budget

    def _TcpConnection__processParseMessage(self) -> Any:
        if self.state == CONNECTION_STATE.DISCONNECTED:
            return None
        buffer = self._read_buffer()
        try:
            length = frame_length(buffer, authenticated=self.authenticated, limits=self._limits)
        except FrameRefused as err:
            self._counters.frames_refused += 1
            self._refuse("frame", err)
            return None
        if length is None or len(buffer) < _PREFIX.size + length:
            return None
        data = bytes(buffer[_PREFIX.size : _PREFIX.size + length])
        del buffer[: _PREFIX.size + length]
        try:
            message = self._open(data)
        except Exception as err:
            self._counters.messages_refused += 1
            self._refuse("message", ValueError(f"message refused ({type(err).__name__}: {err})"))
            return None
        self.authenticated = True
        return message

    def _check_sequence(self, current: tuple[bytes, int]) -> None:
        """One connection carries one peer process's messages, their counters growing (``RaftCipher.sequence``).

        pysyncobj only refused a timestamp (whole seconds) older than the last, so a
        message replayed within the second, or reordered, was accepted.
        """
        last = self._last_sequence
        if last is not None:
            if current[0] != last[0]:
                raise ValueError("message from another sender process on this connection")
            if current[1] <= last[1]:
                raise ValueError(f"message counter {current[1]} not above {last[1]}: replayed or reordered")
        self._last_sequence = current

    def _open(self, data: bytes) -> Any:
        """Authenticate, decrypt, inflate and unpickle one frame, as pysyncobj does, with bounds and no ``assert``."""
        encryptor = self.encryptor
        if encryptor is not None:
            timestamp: int = encryptor.extract_timestamp(data)  # authenticates the whole token
            if timestamp < self.recvLastTimestamp:
                raise ValueError("timestamp older than the connection's last message")
            sequence = getattr(encryptor, "sequence", None)
            if sequence is not None:
                self._check_sequence(sequence(data))
            self.recvLastTimestamp = timestamp
            data = encryptor.decrypt(data)
        inflater = zlib.decompressobj()
        # A frame inflates to at most message_bytes_max: a zlib bomb stops there.
        plain = inflater.decompress(data, self._limits.message_bytes_max)
        if inflater.unconsumed_tail or not inflater.eof:
            raise ValueError(f"message inflates past message_bytes_max ({self._limits.message_bytes_max})")
        message = raft_pickle.loads(plain)
        if self.recvRandKey:
            if not (isinstance(message, tuple) and len(message) == 2 and message[0] == self.recvRandKey):
                raise ValueError("message not bound to this connection's key")
            message = message[1]
        return message


class GuardedTcpServer(TcpServer):  # type: ignore[misc]
    """pysyncobj's listener that survives accept errors and bounds connections still in their handshake.

    ``sweep()`` must be called every tick (the transport does): it closes
    handshakes past their deadline, which pysyncobj only checks when a
    connection has an event, and resumes a paused listener.
    """

    def __init__(self, poller: Any, host: str, port: int, on_new_connection: Callable[[Any], None], *,
                 limits: RaftWireLimits, counters: WireCounters, connection_factory: Callable[..., Any],
                 **kwargs: Any) -> None:
        super().__init__(poller, host, port, on_new_connection, **kwargs)
        self._limits = limits
        self._counters = counters
        self._factory = connection_factory
        #: Accepted connections not yet authenticated, oldest first (dicts keep insertion order).
        self._handshaking: dict[GuardedTcpConnection, None] = {}
        self._paused_until: float | None = None

    @property
    def handshaking(self) -> int:
        return len(self._handshaking)

    def _TcpServer__onNewConnection(self, descr: Any, event: int) -> None:
        if event & POLL_EVENT_TYPE.ERROR:
            # As pysyncobj did: a listening socket in error is closed (the node logs and keeps serving peers).
            log.error("raft listener socket reported an error; unbinding it")
            self.unbind()
            return
        if not event & POLL_EVENT_TYPE.READ:
            return
        listener = self._TcpServer__socket
        if listener is None:
            return
        try:
            sock, _ = listener.accept()
        except OSError as err:
            if err.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                return
            self._counters.accept_errors += 1
            if accept_error_action(err.errno) == ACCEPT_PAUSE:
                # Free a descriptor for the next accept; a handshake that old is the likeliest attacker.
                self._evict_oldest()
                self._pause()
            _warn.warn("accept", "raft listener: accept failed (%s); the listener stays open", err)
            return
        try:
            self._set_up(sock)
        except OSError as err:
            sock.close()
            _warn.warn("accept", "raft listener: setting up an accepted socket failed (%s)", err)

    def _set_up(self, sock: socket.socket) -> None:
        send_size = self._TcpServer__sendBufferSize
        recv_size = self._TcpServer__recvBufferSize
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_size)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, recv_size)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        self.sweep()
        while len(self._handshaking) >= self._limits.unauthenticated_connections_max:
            self._evict_oldest()
        conn = self._factory(poller=self._TcpServer__poller, socket=sock,
                             timeout=self._TcpServer__connectionTimeout, sendBufferSize=send_size,
                             recvBufferSize=recv_size, keepalive=self._TcpServer__keepalive)
        self._handshaking[conn] = None
        self._TcpServer__onNewConnectionCallback(conn)

    def _evict_oldest(self) -> None:
        for conn in self._handshaking:
            del self._handshaking[conn]
            if conn.state != CONNECTION_STATE.DISCONNECTED and not conn.authenticated:
                self._counters.handshakes_evicted += 1
                _warn.warn("evict", "raft listener: %d connections in their handshake; closing the oldest",
                           self._limits.unauthenticated_connections_max)
                conn.disconnect()
            return

    def _pause(self) -> None:
        fileno = self._TcpServer__fileno
        if fileno is not None and self._paused_until is None:
            self._TcpServer__poller.unsubscribe(fileno)
        self._paused_until = raft_clock() + self._limits.accept_pause_s

    def sweep(self) -> None:
        """Forget settled handshakes, close expired ones, and resume a paused listener that is due."""
        for conn in list(self._handshaking):
            if conn.authenticated or conn.state == CONNECTION_STATE.DISCONNECTED:
                del self._handshaking[conn]
            elif conn.handshake_expired:
                del self._handshaking[conn]
                conn._TcpConnection__processConnectionTimeout()
        if self._paused_until is not None and raft_clock() >= self._paused_until:
            self._paused_until = None
            fileno = self._TcpServer__fileno
            if fileno is not None:
                self._TcpServer__poller.subscribe(fileno, self._TcpServer__onNewConnection,
                                                  POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.ERROR)

    def unbind(self) -> None:
        self._paused_until = None
        super().unbind()
