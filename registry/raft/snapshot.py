"""Our snapshot files: a magic prefix, a CRC32 and a msgpack envelope; never pickle."""

from __future__ import annotations

import contextlib
import os
import zlib
from typing import IO, Any

import msgpack

from registry.errors import BadRequest

__all__ = ["SNAPSHOT_FORMAT", "SNAPSHOT_MAGIC", "open_private", "read_snapshot_file"]

SNAPSHOT_FORMAT = 1
#: Magic prefix of our dump files, so a foreign or pickled file is refused.
SNAPSHOT_MAGIC = b"RREGSNP1"


def open_private(path: str) -> IO[bytes]:
    """A new file at ``path`` for writing, readable by its owner only (mode 0600, whatever the umask).

    Snapshots hold every user's password hash and every token's secret hash.  A file left
    at ``path`` (an interrupted write) is removed first: it could carry wider permissions.
    """
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "wb")


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
