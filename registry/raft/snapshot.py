"""Our snapshot files: a magic prefix, a CRC32 and a msgpack envelope; never pickle."""

from __future__ import annotations

import zlib
from typing import Any

import msgpack

from registry.errors import BadRequest

__all__ = ["SNAPSHOT_FORMAT", "SNAPSHOT_MAGIC", "read_snapshot_file"]

SNAPSHOT_FORMAT = 1
#: Magic prefix of our dump files, so a foreign or pickled file is refused.
SNAPSHOT_MAGIC = b"RREGSNP1"


def read_snapshot_file(filename: str) -> dict[str, Any]:
    """Read and check one of our snapshot files; raise BadRequest if it is not one."""
    with open(filename, "rb") as f:
        data = f.read()
    if not data.startswith(SNAPSHOT_MAGIC) or len(data) < len(SNAPSHOT_MAGIC) + 4:
        raise BadRequest(f"{filename}: not a raft-registry snapshot (bad magic)")
    crc = int.from_bytes(data[len(SNAPSHOT_MAGIC) : len(SNAPSHOT_MAGIC) + 4], "big")
    body = data[len(SNAPSHOT_MAGIC) + 4 :]
    if zlib.crc32(body) != crc:
        raise BadRequest(f"{filename}: snapshot checksum mismatch (corrupt file)")
    envelope = msgpack.unpackb(body, raw=False)
    if not isinstance(envelope, dict) or envelope.get("format") != SNAPSHOT_FORMAT:
        raise BadRequest(f"{filename}: unsupported snapshot format")
    return envelope
