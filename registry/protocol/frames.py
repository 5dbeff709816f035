"""Length-prefixed msgpack framing: bytes in, decoded maps out.

Wire format of one frame::

    +----------------------------+------------------------------+
    | length: uint32, big-endian | body: ``length`` bytes of    |
    |                            | msgpack, exactly one map     |
    +----------------------------+------------------------------+

Theory of operation
-------------------
``encode_frame`` packs an object and prefixes its length.  ``FrameDecoder``
is the sans-IO reverse: the caller ``feed``s whatever bytes the socket
produced, in chunks of any size, then calls ``next_frame`` until it returns
``None`` (meaning: read more).  Nothing here does I/O, blocks or keeps time.

Hostile input is the design constraint, so the decoder

* checks the length prefix as soon as its 4 bytes arrive and refuses an
  oversize frame *before* buffering its body: a peer cannot make us hold more
  than one frame limit (plus the 4-byte prefix) of a partial frame;
* decodes a body only once it is complete, with msgpack's per-container limits
  set to the body's own length (every element costs at least one byte), so a
  tiny body cannot declare a billion-element array and make msgpack allocate it;
* walks the result once to enforce the data model: str map keys only, no ext
  types, at most ``NESTING_DEPTH_MAX`` containers deep.  Depth is bounded so
  that code handling a decoded frame may recurse (and re-pack it) safely;
* is dead after its first error: every later ``next_frame`` raises that same
  error, because after garbage the stream has no trustworthy frame boundary.

``encode_frame`` runs the same data-model check, so anything we send is
something our own decoder accepts.

The client's decoder (``FrameDecoder(check_model=False)``) skips the walk: a
client trusts the node it chose to talk to, which only ever sends frames in
the data model, and the walk was 30% of a client's CPU per read of a
3-instance service.  msgpack's limits still bound what a body can allocate,
and a node decodes every client frame with the full check.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from typing import Any, Final

import msgpack

from registry.errors import FrameTooLarge, Internal, InvalidArgument, ProtocolError, RegistryError

__all__ = [
    "FRAME_BYTES_MAX_DEFAULT",
    "FRAME_PREFIX_BYTES",
    "NESTING_DEPTH_MAX",
    "FrameDecoder",
    "check_frame_model",
    "encode_frame",
]

#: Default largest frame body, in bytes.  A typical instance record (id, host,
#: port, status, weight, a few metadata pairs) packs to ~60-100 bytes, so 1 MiB
#: holds a 10k-instance service listing in one response, while a hostile peer
#: can pin at most ~1 MiB of partial frame per connection.  Deployments with
#: bigger listings raise ``frame_bytes_max`` in the node config.
FRAME_BYTES_MAX_DEFAULT: Final = 1 << 20

#: Size of the length prefix, in bytes.
FRAME_PREFIX_BYTES: Final = 4

#: Largest limit the prefix can express, in bytes.
_PREFIX_VALUE_MAX: Final = (1 << 32) - 1

#: Deepest container nesting in a frame, counting the frame's own map as 1.
#: Real messages are ~5 deep (frame -> args -> metadata -> value); 32 leaves
#: room while staying far below msgpack's packer recursion limit (511) and
#: Python's stack, so code that recurses over a decoded frame cannot crash.
NESTING_DEPTH_MAX: Final = 32

_PREFIX: Final = struct.Struct(">I")

#: Scalar types of the data model.  bool is an int subclass; listed for clarity.
_SCALARS: Final = (type(None), bool, int, float, str, bytes)
_SCALAR_TYPES: Final = frozenset(_SCALARS)


def _check_data_model(obj: object, err: type[RegistryError]) -> None:
    """Raise ``err`` unless ``obj`` uses only the protocol's data model.

    Iterative, level by level, on purpose: a recursive walk is exactly what
    the depth limit protects, and holding only containers (not one tuple per
    value) keeps a hostile frame of a million tiny values cheap to check.
    Tuples are accepted (they pack as arrays) so encoders may pass them.
    """
    level: list[object] = [obj]
    depth = 0
    while level:
        depth += 1
        if depth > NESTING_DEPTH_MAX:
            raise err(f"nesting deeper than {NESTING_DEPTH_MAX}")
        deeper: list[object] = []
        for container in level:
            items: Iterable[object]
            if isinstance(container, dict):
                for key in container:
                    if not isinstance(key, str):
                        raise err(f"map key must be a string, not {type(key).__name__}")
                items = container.values()
            elif isinstance(container, list | tuple):
                items = container
            else:
                raise err(f"unsupported value type {type(container).__name__}")
            for item in items:
                if type(item) in _SCALAR_TYPES:
                    continue  # fast path: decoded values are never subclasses
                if isinstance(item, dict | list | tuple):
                    # An empty container is fully checked once its depth is.
                    if item or depth >= NESTING_DEPTH_MAX:
                        deeper.append(item)
                elif not isinstance(item, _SCALARS):
                    raise err(f"unsupported value type {type(item).__name__}")
        level = deeper


def check_frame_model(frame: dict[str, Any], err: type[RegistryError], *, except_key: str | None = None) -> None:
    """The data-model walk of a decoded frame, leaving out the value of ``except_key`` (if any).

    For a request whose args the receiver checks field by field by exact type
    (``registry.fsm.ops.WRITE_OPS``): the rest of the frame is walked as always, at the
    same depths.
    """
    if except_key is None:
        _check_data_model(frame, err)
        return
    for key, value in frame.items():
        if type(key) is not str:
            _check_data_model(frame, err)  # names the bad key
        if key != except_key and type(value) not in _SCALAR_TYPES:
            _check_data_model({key: value}, err)


def _check_limit(frame_bytes_max: int) -> None:
    if not 1 <= frame_bytes_max <= _PREFIX_VALUE_MAX:
        raise InvalidArgument(f"frame_bytes_max must be 1..{_PREFIX_VALUE_MAX}, not {frame_bytes_max}")


def encode_frame(obj: object, frame_bytes_max: int = FRAME_BYTES_MAX_DEFAULT, *,
                 check_model: bool = True, pack: Callable[[Any], bytes] | None = None) -> bytes:
    """Return one frame (prefix + body) for ``obj``.

    Raises ``FrameTooLarge`` if the body exceeds ``frame_bytes_max``, and
    ``Internal`` if ``obj`` is outside the data model (a bug in the caller:
    non-str keys, unsupported types, too deep, int out of msgpack's range).

    ``check_model=False`` skips the data-model walk (not msgpack's own
    errors) for callers that built ``obj`` from data already in the model,
    such as state records: the walk costs ~10 us for a small service listing,
    more than packing it.

    ``pack``: a reused ``msgpack.Packer(use_bin_type=True).pack`` (one thread
    only).  ``packb`` builds a Packer per call, about 1.1 us of the 2 us a
    small response takes; a Packer resets itself when packing fails.
    """
    _check_limit(frame_bytes_max)
    if not isinstance(obj, dict):
        raise Internal(f"a frame must be a map, not {type(obj).__name__}")
    if check_model:
        _check_data_model(obj, Internal)
    try:
        body: bytes = msgpack.packb(obj, use_bin_type=True) if pack is None else pack(obj)
    except (TypeError, ValueError, OverflowError) as exc:
        raise Internal(f"unencodable frame: {exc}") from exc
    if len(body) > frame_bytes_max:
        raise FrameTooLarge(f"frame of {len(body)} bytes exceeds the {frame_bytes_max}-byte limit")
    return _PREFIX.pack(len(body)) + body


def _decode_body(body: bytes, check_model: bool = True) -> dict[str, Any]:
    size = len(body)
    try:
        obj = msgpack.unpackb(
            body,
            raw=False,  # str is UTF-8 text; bin stays bytes
            use_list=True,
            strict_map_key=True,  # only str/bytes keys; bytes are refused below
            # Each element takes at least 1 byte (a map entry 2), so these
            # never refuse a legitimate body yet bound any preallocation.
            max_str_len=size,
            max_bin_len=size,
            max_array_len=size,
            max_map_len=size // 2,
            max_ext_len=0,  # the protocol has no ext types
        )
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as exc:
        # ValueError covers ExtraData (trailing bytes), FormatError,
        # StackError, bad UTF-8 and limit overruns; UnpackException covers
        # OutOfData (a body cut short).
        raise ProtocolError(f"undecodable frame: {type(exc).__name__}: {exc}"[:200]) from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"frame body must be a map, not {type(obj).__name__}")
    if check_model:
        _check_data_model(obj, ProtocolError)
    return obj


class FrameDecoder:
    """Incremental, sans-IO decoder of length-prefixed msgpack frames."""

    __slots__ = ("_buf", "_check_model", "_error", "_frame_bytes_max")

    def __init__(self, frame_bytes_max: int = FRAME_BYTES_MAX_DEFAULT, *, check_model: bool = True) -> None:
        """``check_model=False``: skip the data-model walk (for trusted peers; see the module docstring)."""
        _check_limit(frame_bytes_max)
        self._frame_bytes_max = frame_bytes_max
        self._check_model = check_model
        # bytearray: CPython makes deleting from the front O(1) amortised.
        self._buf = bytearray()
        self._error: RegistryError | None = None

    @property
    def error(self) -> RegistryError | None:
        """The error that killed this decoder, or None while it is healthy."""
        return self._error

    @property
    def pending_bytes(self) -> int:
        """Bytes buffered but not yet returned as a frame (nonzero at EOF = truncated)."""
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        """Buffer ``data``.  Never raises for bad input: errors come from ``next_frame``.

        Once the decoder is dead the data is dropped, so a peer that keeps
        sending garbage cannot grow our memory.
        """
        if self._error is not None:
            return
        self._buf += data
        self._check_prefix()

    def next_frame(self) -> dict[str, Any] | None:
        """Return the next decoded frame, or None if more bytes are needed."""
        body = self.next_body()
        return None if body is None else self.decode_body(body)

    def next_body(self) -> bytes | None:
        """The next frame's body, undecoded, or None if more bytes are needed.

        For a caller that recognises a body it has already decoded (a client
        with many identical watches gets the same stream body on each of
        them); anything else it must pass to ``decode_body``.
        """
        length = self._check_prefix()
        if self._error is not None:
            # with_traceback(None): re-raising one instance would otherwise
            # grow its traceback on every call.
            raise self._error.with_traceback(None)
        if length is None or len(self._buf) < FRAME_PREFIX_BYTES + length:
            return None
        body = bytes(self._buf[FRAME_PREFIX_BYTES : FRAME_PREFIX_BYTES + length])
        del self._buf[: FRAME_PREFIX_BYTES + length]
        # Check the following frame's prefix now, so an oversize one is
        # refused before the caller buffers its body.
        self._check_prefix()
        return body

    def decode_body(self, body: bytes) -> dict[str, Any]:
        """Decode a body from ``next_body`` exactly as ``next_frame`` would (an error kills the decoder)."""
        try:
            return _decode_body(body, self._check_model)
        except RegistryError as exc:
            self._die(exc)
            raise

    def _check_prefix(self) -> int | None:
        """Validate the prefix of the frame at the buffer's head; return its length.

        Records (does not raise) the error, so ``feed`` can call it too.
        """
        if self._error is not None or len(self._buf) < FRAME_PREFIX_BYTES:
            return None
        (length,) = _PREFIX.unpack_from(self._buf)
        if length > self._frame_bytes_max:
            self._die(
                FrameTooLarge(f"frame of {length} bytes exceeds the {self._frame_bytes_max}-byte limit")
            )
            return None
        if length == 0:
            # msgpack has no empty value; a zero length is garbage, not a frame.
            self._die(ProtocolError("zero-length frame"))
            return None
        return int(length)

    def _die(self, exc: RegistryError) -> None:
        self._error = exc
        self._buf = bytearray()  # nothing after a broken boundary is usable
