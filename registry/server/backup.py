"""Backup files: a consistent copy of the state at a stated revision.

Format (version 1): the magic ``RREGBAK1``, a big-endian CRC32 of the body,
then the msgpack body ``{"format": 1, "revision": R, "created_ms": T,
"state": <RegistryState.snapshot() bytes>}``.  A file with another magic, a
bad checksum, another format or a state that does not restore cleanly is
refused with ``BadRequest`` and nothing is written.

A restored data directory holds the backup as ``seed.snapshot``.  A node
whose data directory has a seed but no Raft snapshot of its own starts from
the seed's state; once it compacts, its own snapshot (which includes the
seed) takes over.  The seed is never deleted, so a restart before the first
compaction still has it.
"""

from __future__ import annotations

import contextlib
import os
import zlib
from pathlib import Path
from typing import Any

import msgpack

from registry.errors import BadRequest
from registry.fsm.limits import StateLimits
from registry.fsm.state import RegistryState

__all__ = ["BACKUP_MAGIC", "SEED_FILE", "encode_backup", "decode_backup", "write_atomic", "seed_data_dir"]

BACKUP_MAGIC = b"RREGBAK1"
BACKUP_FORMAT = 1
SEED_FILE = "seed.snapshot"
#: Files that mean a data directory already belongs to a cluster.
RAFT_FILES = ("raft.journal", "raft.snapshot")


def encode_backup(state_bytes: bytes, revision: int, created_ms: int) -> bytes:
    body: bytes = msgpack.packb(
        {"format": BACKUP_FORMAT, "revision": revision, "created_ms": created_ms, "state": state_bytes},
        use_bin_type=True,
    )
    return BACKUP_MAGIC + zlib.crc32(body).to_bytes(4, "big") + body


def decode_backup(data: bytes, *, source: str = "backup",
                  limits: StateLimits | None = None) -> tuple[RegistryState, dict[str, Any]]:
    """Check and load a backup; return the state and the envelope's metadata."""
    head = len(BACKUP_MAGIC) + 4
    if len(data) < head or not data.startswith(BACKUP_MAGIC):
        raise BadRequest(f"{source}: not a raft-registry backup (bad magic)")
    body = data[head:]
    if zlib.crc32(body) != int.from_bytes(data[len(BACKUP_MAGIC) : head], "big"):
        raise BadRequest(f"{source}: checksum mismatch: the file is corrupt")
    try:
        envelope = msgpack.unpackb(body, raw=False)
    except Exception as err:
        raise BadRequest(f"{source}: undecodable body: {err}") from None
    if not isinstance(envelope, dict) or envelope.get("format") != BACKUP_FORMAT:
        raise BadRequest(f"{source}: unsupported backup format")
    state_bytes = envelope.get("state")
    revision = envelope.get("revision")
    if not isinstance(state_bytes, bytes) or not isinstance(revision, int):
        raise BadRequest(f"{source}: malformed backup envelope")
    try:
        state = RegistryState.restore(state_bytes, limits)
    except BadRequest as err:
        raise BadRequest(f"{source}: {err.message}") from None
    if state.revision != revision:
        raise BadRequest(f"{source}: state is at revision {state.revision}, envelope says {revision}")
    return state, {"revision": revision, "created_ms": envelope.get("created_ms")}


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a fsynced temporary file, readable by its owner only.

    A backup holds every user's password hash and every token's secret hash: mode 0600,
    whatever the umask (``os.open``'s mode only ever removes bits; fchmod sets them).
    """
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)  # a stale one could carry wider permissions
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def seed_data_dir(data: bytes, data_dir: Path) -> dict[str, Any]:
    """Check a backup and place it as the seed of a fresh data directory."""
    _, meta = decode_backup(data)
    data_dir.mkdir(parents=True, exist_ok=True)
    existing = [name for name in (*RAFT_FILES, SEED_FILE) if (data_dir / name).exists()]
    if existing:
        raise BadRequest(f"{data_dir} already holds cluster data ({', '.join(existing)}); restore needs a fresh dir")
    write_atomic(data_dir / SEED_FILE, data)
    return meta


def load_seed(data_dir: Path, limits: StateLimits | None = None) -> RegistryState | None:
    """The seed state of a restored data directory, if the node should start from it."""
    seed = data_dir / SEED_FILE
    if not seed.exists() or (data_dir / "raft.snapshot").exists():
        return None
    state, _ = decode_backup(seed.read_bytes(), source=str(seed), limits=limits)
    # The backed-up cluster's data-directory identities would make the new
    # cluster's nodes refuse each other (same addresses, new directories).
    state.forget_identities()
    return state
