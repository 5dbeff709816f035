"""Stream items encoded once and framed per stream.

A watch sends the same item (a chunk of events, a snapshot part) to many
streams.  ``StreamEvent(id, body).to_wire()`` is the map
``{"t": "ev", "id": id, "body": body}``, and a msgpack map is its entries'
encodings concatenated, so the frame of that event is exactly::

    length prefix | stream_event_head(id) | body encoded once

The head depends only on the stream, the body only on the item: a sender
encodes the body once and writes ``frame_prefix`` + head + the shared body
bytes per stream.  The receiver sees an ordinary ``StreamEvent`` frame
(tests check the bytes decode to the same message), so this is an encoding
shortcut, not a protocol change.
"""

from __future__ import annotations

import struct
from typing import Final

import msgpack

from registry.errors import FrameTooLarge
from registry.protocol.messages import REQUEST_ID_MAX

__all__ = ["stream_event_head", "shared_frame_prefix", "frame_shared_bodies"]

_PREFIX: Final = struct.Struct(">I")
#: fixmap(3), "t": "ev", "id": ... in the order ``StreamEvent.to_wire`` uses.
_HEAD_START: Final = b"\x83\xa1t\xa2ev\xa2id"
_HEAD_END: Final = b"\xa4body"


def stream_event_head(request_id: object) -> bytes:
    """The encoded map of ``StreamEvent(request_id, body)`` up to (not including) the body's value.

    ``object``, checked here: a mypyc-compiled ``int`` parameter would turn ``True`` into 1 (#24).
    """
    if not isinstance(request_id, int) or isinstance(request_id, bool) or not 0 <= request_id <= REQUEST_ID_MAX:
        raise ValueError(f"bad stream id {request_id!r}")
    packed: bytes = msgpack.packb(request_id)
    return _HEAD_START + packed + _HEAD_END


def shared_frame_prefix(head: bytes, body_bytes: int, frame_bytes_max: int) -> bytes:
    """Length prefix + ``head`` for a frame whose encoded body value is ``body_bytes`` long."""
    length = len(head) + body_bytes
    if length > frame_bytes_max:
        raise FrameTooLarge(f"frame of {length} bytes exceeds the {frame_bytes_max}-byte limit")
    return _PREFIX.pack(length) + head


def frame_shared_bodies(head: bytes, bodies: list[bytes], frame_bytes_max: int) -> tuple[list[bytes], int] | None:
    """The frames of one stream's items: [prefix + ``head``, body, ...] and their total bytes.

    None if any body would not fit a frame (the caller then sends through the
    path that fails the stream with FRAME_TOO_LARGE).  Runs once per watcher
    per published batch, so it is kept to a few operations on purpose.
    """
    head_len = len(head)
    limit = frame_bytes_max - head_len
    for body in bodies:
        if len(body) > limit:
            return None
    parts: list[bytes] = []
    append = parts.append
    pack = _PREFIX.pack
    size = 0
    for body in bodies:
        body_len = len(body)
        append(pack(head_len + body_len) + head)
        append(body)
        size += 4 + head_len + body_len
    return parts, size
