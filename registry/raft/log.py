"""The Raft log on disk: append-only segments with a CRC per record, fsynced in groups.

Theory of operation
-------------------
``RaftLog`` is the journal object pysyncobj keeps its log, term and vote in
(it replaces pysyncobj's mmap'd ``FileJournal``, which is never fsynced and
cannot run on a direct_io FUSE file system).  pysyncobj reads the entries
from memory: ``RaftLog`` keeps them all in a list, as pysyncobj did, and the
files exist only so that the list survives a crash.

Files, all in one directory (``raft-log/`` in the node's data dir):

* ``%016d.seg``: segments, numbered by sequence (not by Raft index).  Each is
  ``SEGMENT_HEADER`` (magic and format version, 8 bytes) then records::

      u32 length | u32 crc32(payload) | payload
      payload = u8 kind | u64 index | u64 term | data

  Kinds: ``ENTRY`` (index, term, command), ``TRUNCATE`` (drop every entry
  with index >= i), ``FIRST`` (compaction: drop every entry with index < i),
  ``RESET`` (everything before is void: a snapshot was installed) and
  ``COMMIT`` (the commit index, see below).  The log is the result of
  applying every record of every segment in order (``LogImage``), so nothing
  is ever rewritten in place: a truncation or a compaction is one record.
* ``raft-term``: the current term and vote, msgpack, replaced as a whole
  (temp file, fsync, rename, directory fsync) each time pysyncobj changes
  them (once per term or vote); never pickle.

Durability.  Writes are buffered in memory and ``sync()`` writes them and
calls one ``fdatasync``: the node calls it once per Raft tick, before any
message that relies on the tick's appends leaves (see ``registry/raft/node.py``).
Nothing between two syncs is durable; a crash may keep any prefix of it.
The commit index must never name an entry that is not durable (pysyncobj
applies up to it at start, before it hears from a leader), so
``setRaftCommitIndex`` only remembers the value; ``sync()`` appends a
``COMMIT`` record after the entries it covers and before the fdatasync, and
replay clamps every commit index to the entries present when it is read.
A segment is fsynced whole before the next one is created, and the directory
is fsynced after a file is created, renamed or deleted.

Compaction (``deleteEntriesTo``) appends ``FIRST``; once that record is
durable (after the next sync), whole old segments whose entries all lie
below the first kept index are deleted, oldest first.  A snapshot install
(``clear``) starts a new segment with ``RESET``, and every older segment
goes after the next sync.  Replay therefore starts at whichever segment is
oldest on disk: every record that matters is in the segments that remain.

Recovery on open.  Segments are read in order.  A record that cannot be read
(its header or payload runs past the end of the file, its length is out of
range, its CRC does not match) at the end of the *last* segment, with no
valid record anywhere after it, is a torn write: the file is truncated there,
logged once and counted (``torn_tails_truncated``).  Anything else (a bad
record followed by a valid one, a bad record in an older segment, a bad
header, a missing segment in the sequence, an undecodable term file) is
corruption: ``LogCorrupted``, one line naming the file and the byte offset,
and the node refuses to start.  Finding "a valid record after it" scans the
rest of the file byte by byte; that only happens after a crash, over what
follows the bad record.

Errors.  A failed write, fdatasync, rename or delete (ENOSPC, EIO) makes the
log *failed*: every later ``sync()`` raises ``LogWriteFailed`` again, so no
message relying on an unpersisted entry can leave.  The node exits on it
(see docs/durability.md); on restart the log is replayed and a torn tail
truncated.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import re
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import msgpack

__all__ = [
    "RaftLog", "LogImage", "LogRefused", "LogCorrupted", "LogWriteFailed", "Record", "SegmentScan",
    "scan_segment", "encode_record", "segment_name",
    "ENTRY", "TRUNCATE", "FIRST", "RESET", "COMMIT", "SEGMENT_HEADER", "SEGMENT_BYTES_MAX",
    "RECORD_BYTES_MAX", "TERM_FILE", "COMMIT_INDEX_DEFAULT",
]

log = logging.getLogger("registry.raft.log")

#: Magic (5 bytes), reserved (2), format version (1).
SEGMENT_HEADER = b"RRLOG\x00\x00\x01"
#: Record kinds (the first payload byte).
ENTRY, TRUNCATE, FIRST, RESET, COMMIT = 1, 2, 3, 4, 5
_KINDS = frozenset((ENTRY, TRUNCATE, FIRST, RESET, COMMIT))
#: A new segment starts once the active one holds this many bytes: small
#: enough that compaction frees disk soon, large enough that rotations (one
#: fsync of the old segment and one of the directory) are rare.
SEGMENT_BYTES_MAX = 64 << 20
#: Longest record payload accepted (bytes).  An entry is one pysyncobj command
#: (a batch of at most NodeConfig.batch_commands_max commands of at most
#: frame_bytes_max each, far below this); a length above it can only be damage.
RECORD_BYTES_MAX = 1 << 30
#: Buffered record bytes that ``add`` writes out without waiting for ``sync``
#: (a follower catching up can append many megabytes in one tick).
WRITE_BUFFER_BYTES_MAX = 1 << 20
#: The term-and-vote file, and the temp file it is written through.
TERM_FILE = "raft-term"
_TERM_TEMP = TERM_FILE + ".tmp"
#: pysyncobj's commit index when none was ever stored (its FileJournal's default).
COMMIT_INDEX_DEFAULT = 1

_RECORD_HEAD = struct.Struct("<II")  # length, crc32
_PAYLOAD_HEAD = struct.Struct("<BQQ")  # kind, index, term
_SEGMENT_NAME = re.compile(r"^(\d{16})\.seg$")


class LogRefused(Exception):
    """The node must not start on this data directory; the message is one line saying why."""


class LogCorrupted(LogRefused):
    """The log on disk is damaged beyond a torn tail.

    The message is one line naming the file and the byte offset.
    """

    def __init__(self, path: Path | str, offset: int, why: str) -> None:
        super().__init__(f"raft log corrupted: {path} at byte offset {offset}: {why}")
        self.path = str(path)
        self.offset = offset


class LogWriteFailed(Exception):
    """Writing or syncing the log failed (ENOSPC, EIO ...); nothing written since the last sync is durable."""

    def __init__(self, what: str, cause: OSError) -> None:
        name = errno.errorcode.get(cause.errno or 0, "EIO")
        super().__init__(f"raft log {what} failed: {name}: {cause.strerror or cause}")
        self.cause = cause


def segment_name(seq: int) -> str:
    return f"{seq:016d}.seg"


def encode_record(kind: int, index: int, term: int, data: bytes = b"") -> bytes:
    """One record's bytes: length, CRC32 of the payload, payload."""
    payload = _PAYLOAD_HEAD.pack(kind, index, term) + data
    return _RECORD_HEAD.pack(len(payload), zlib.crc32(payload)) + payload


@dataclass(frozen=True, slots=True)
class Record:
    kind: int
    index: int
    term: int
    data: bytes
    #: Byte offset of the record's first byte in its segment.
    offset: int


@dataclass(slots=True)
class SegmentScan:
    """What ``scan_segment`` found in one segment's bytes."""

    records: list[Record]
    #: Bytes of the segment that hold its header and whole valid records.
    valid_bytes: int
    #: Offset of the first unreadable record, None if the file ends cleanly.
    bad_offset: int | None = None
    #: Why that record is unreadable.
    bad_why: str = ""


def _read_record(data: bytes | memoryview, offset: int) -> tuple[Record | None, str]:
    """The record at ``offset`` if it is whole and its CRC matches, else (None, why)."""
    size = len(data)
    if offset + _RECORD_HEAD.size > size:
        return None, "record header runs past the end of the file"
    length, crc = _RECORD_HEAD.unpack_from(data, offset)
    if not _PAYLOAD_HEAD.size <= length <= RECORD_BYTES_MAX:
        return None, f"record length {length} out of range"
    start = offset + _RECORD_HEAD.size
    end = start + length
    if end > size:
        return None, "record runs past the end of the file"
    payload = data[start:end]
    if zlib.crc32(payload) != crc:
        return None, "record CRC mismatch"
    kind, index, term = _PAYLOAD_HEAD.unpack_from(payload, 0)
    return Record(kind, index, term, bytes(payload[_PAYLOAD_HEAD.size:]), offset), ""


#: A byte that can open a payload (a record kind): where a record may start, 8 bytes before.
_KIND_BYTE = re.compile(b"(?=[" + bytes(sorted(_KINDS)) + b"])")


def _valid_record_after(data: bytes, offset: int) -> int | None:
    """The offset of the first whole record with a matching CRC that starts after ``offset``, if any.

    Only offsets whose payload would open with a known kind are tried (the
    regex finds them at C speed), so a scan of a torn 64 MiB tail takes
    seconds, not a minute.
    """
    size = len(data)
    view = memoryview(data)
    head = _RECORD_HEAD
    low = _PAYLOAD_HEAD.size
    last = size - head.size - low
    for match in _KIND_BYTE.finditer(data, offset + 1 + head.size):
        at = match.start() - head.size
        if at > last:
            break
        length, crc = head.unpack_from(view, at)
        if low <= length <= size - at - head.size and zlib.crc32(view[at + head.size:at + head.size + length]) == crc:
            return at
    return None


def scan_segment(data: bytes) -> SegmentScan:
    """Read a segment's records (pure).  The header must have been checked; records start after it.

    Stops at the first unreadable record; a valid CRC with an unknown kind
    counts as unreadable too (it is not a torn write, and the caller treats
    it as corruption whatever follows).
    """
    records: list[Record] = []
    offset = len(SEGMENT_HEADER)
    size = len(data)
    view = memoryview(data)
    while offset < size:
        record, why = _read_record(view, offset)
        if record is None:
            return SegmentScan(records, offset, offset, why)
        if record.kind not in _KINDS:
            return SegmentScan(records, offset, offset, f"unknown record kind {record.kind}")
        records.append(record)
        offset += _RECORD_HEAD.size + _PAYLOAD_HEAD.size + len(record.data)
    return SegmentScan(records, offset)


Entry = tuple[bytes, int, int]


@dataclass(slots=True)
class LogImage:
    """The log that a sequence of records describes (pure): replay applies records to it one by one."""

    entries: list[Entry] = field(default_factory=list)
    commit_index: int = COMMIT_INDEX_DEFAULT

    def last_index(self) -> int | None:
        return self.entries[-1][1] if self.entries else None

    def clamp_commit(self) -> None:
        """The commit index never names an entry that is not in the log."""
        last = self.last_index()
        self.commit_index = min(self.commit_index, last if last is not None else COMMIT_INDEX_DEFAULT)

    def apply(self, kind: int, index: int, term: int, data: bytes) -> None:
        entries = self.entries
        if kind == ENTRY:
            entries.append((data, index, term))
        elif kind == TRUNCATE:
            keep = len(entries)
            while keep and entries[keep - 1][1] >= index:
                keep -= 1
            del entries[keep:]
            self.clamp_commit()
        elif kind == FIRST:
            drop = 0
            while drop < len(entries) and entries[drop][1] < index:
                drop += 1
            del entries[:drop]
        elif kind == RESET:
            entries.clear()
            self.clamp_commit()
        elif kind == COMMIT:
            self.commit_index = index
            self.clamp_commit()
        else:  # scan_segment refuses unknown kinds
            raise AssertionError(f"unknown record kind {kind}")


@dataclass(slots=True)
class _Segment:
    seq: int
    path: Path
    #: Highest entry index ever written to it (None: no entry), for deciding when compaction frees it.
    max_index: int | None = None
    #: Bytes on disk, and how many of them are known durable (for tests of crash states).
    written_bytes: int = 0
    synced_bytes: int = 0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    # The views are released even when a write fails: a live export would stop the buffer from being cleared.
    with memoryview(data) as whole:
        offset = 0
        while offset < len(whole):
            with whole[offset:] as rest:
                offset += os.write(fd, rest)


#: Called after each fdatasync with its duration in seconds and the records it made durable.
SyncObserver = Callable[[float, int], None]


class RaftLog:
    """pysyncobj's journal interface over our segment files (see the module docstring).

    Positions given to ``deleteEntriesFrom``/``deleteEntriesTo`` are relative
    to the first entry held, as in pysyncobj's journals.  Only the Raft thread
    calls it; the counters may be read from any thread.
    """

    def __init__(self, directory: Path | str, *, fsync: bool = True,
                 segment_bytes_max: int = SEGMENT_BYTES_MAX,
                 on_sync: SyncObserver | None = None) -> None:
        """Open (creating if needed) and replay the log in ``directory``; raises ``LogCorrupted``.

        ``fsync=False`` is ``--unsafe-no-fsync``: ``sync()`` writes but never
        fsyncs, so a power loss can lose acknowledged writes.  The rare fsyncs
        that keep the files readable (term file, segment rotation) still run.
        """
        assert segment_bytes_max > len(SEGMENT_HEADER)
        self._dir = Path(directory)
        self._fsync = fsync
        self._segment_bytes_max = segment_bytes_max
        #: Called after each fdatasync (Raft thread); may be set after opening (metrics).
        self.on_sync = on_sync
        #: Counters (read by metrics and tests).
        self.fsyncs = 0
        self.fsync_seconds_total = 0.0
        self.records_synced = 0
        self.torn_tails_truncated = 0
        self._failure: LogWriteFailed | None = None
        self._buffer = bytearray()
        self._records_unsynced = 0
        #: Written with os.write but not yet fdatasynced (the buffer counts as dirty too).
        self._unsynced_written = False
        self._term = 0
        self._voted_for: Any = None
        self._segments: list[_Segment] = []
        #: Segments with a sequence number below this hold nothing live (a RESET follows them).
        self._void_below_seq = 0
        self._fd = -1
        created = not self._dir.exists()
        self._dir.mkdir(parents=True, exist_ok=True)
        if created:
            self._fsync_directory_of(self._dir)
        image = self._replay()
        self._entries = image.entries
        self._commit_index = image.commit_index
        self._commit_written = image.commit_index
        self._read_term()

    # -- pysyncobj's journal interface ---------------------------------------------

    def add(self, command: bytes, idx: int, term: int) -> None:
        entries = self._entries
        assert not entries or idx > entries[-1][1], f"log index {idx} after {entries[-1][1]}"
        command = bytes(command)
        entries.append((command, idx, term))
        self._append(ENTRY, idx, term, command)

    def clear(self) -> None:
        self._entries.clear()
        if self._failure is not None:
            return
        # A snapshot replaces the log: start a new segment with RESET, and drop the older ones after the next sync.
        with contextlib.suppress(LogWriteFailed):  # remembered; sync() raises it
            self._rotate()
            self._void_below_seq = self._segments[-1].seq
            self._append(RESET, 0, 0)

    def deleteEntriesFrom(self, entryFrom: int) -> None:
        assert entryFrom >= 0
        entries = self._entries
        if entryFrom >= len(entries):
            return
        index = entries[entryFrom][1]
        del entries[entryFrom:]
        self._append(TRUNCATE, index, 0)
        # Like pysyncobj, a truncation below the commit index pulls it down.
        last = entries[-1][1] if entries else COMMIT_INDEX_DEFAULT
        self._commit_index = min(self._commit_index, last)

    def deleteEntriesTo(self, entryTo: int) -> None:
        entries = self._entries
        if entryTo <= 0 or not entries:
            return
        index = entries[entryTo][1] if entryTo < len(entries) else entries[-1][1] + 1
        del entries[:entryTo]
        self._append(FIRST, index, 0)

    @overload
    def __getitem__(self, item: int) -> Entry: ...

    @overload
    def __getitem__(self, item: slice) -> list[Entry]: ...

    def __getitem__(self, item: int | slice) -> Entry | list[Entry]:
        return self._entries[item]

    def __len__(self) -> int:
        return len(self._entries)

    def _destroy(self) -> None:
        """Close the files (pysyncobj calls it from ``destroy``); syncs first unless the log failed."""
        if self._fd >= 0:
            if self._failure is None:
                with contextlib.suppress(LogWriteFailed):
                    self.sync()
            os.close(self._fd)
            self._fd = -1

    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:
        # Remembered only: sync() writes it after the entries it covers (see the module docstring).
        self._commit_index = raftCommitIndex

    def getRaftCommitIndex(self) -> int:
        return self._commit_index

    def setCurrentTerm(self, term: int, votedForNodeId: Any) -> None:
        """Store term and vote durably before returning: Raft may send a vote grant right after.

        Fsynced even with ``fsync=False``: it happens once per term or vote, and
        without it a power cut can leave the new name pointing at an empty file.
        """
        self._check_usable()
        body = msgpack.packb({"term": term, "voted_for": votedForNodeId})
        temp = self._dir / _TERM_TEMP
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                _write_all(fd, body)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, self._dir / TERM_FILE)
            _fsync_dir(self._dir)
        except OSError as exc:
            raise self._fail("term file write", exc) from exc
        self._term = term
        self._voted_for = votedForNodeId

    def getCurrentTerm(self) -> int:
        return self._term

    def getVotedForNodeId(self) -> Any:
        return self._voted_for

    def onOneSecondTimer(self) -> None:
        # The node syncs every tick; this only covers a SyncObj ticking without it.
        if self.dirty and self._failure is None:
            self.sync()

    # -- durability ------------------------------------------------------------------

    @property
    def dirty(self) -> bool:
        """True if something appended (or a new commit index) is not yet durable (always, once failed)."""
        return self.entries_dirty or self._commit_index != self._commit_written

    @property
    def entries_dirty(self) -> bool:
        """True if a record (an entry, a truncation ...) is not yet durable: messages that rely on it must wait.

        A commit index alone does not count: no message relies on it being
        durable (a node that forgets it only waits for the leader to repeat it).
        Always true once the log has failed, so nothing waiting on it is ever sent.
        """
        return bool(self._buffer) or self._unsynced_written or self._failure is not None

    @property
    def failed(self) -> LogWriteFailed | None:
        """The error that failed the log, if one did (then nothing more is written)."""
        return self._failure

    @property
    def fsync_enabled(self) -> bool:
        return self._fsync

    def sync(self) -> None:
        """Make everything appended so far durable with one fdatasync; a no-op when nothing is dirty.

        Raises ``LogWriteFailed`` (now and on every later call) if a write or the fdatasync fails.
        """
        self._check_usable()
        if self._commit_index != self._commit_written:
            self._append(COMMIT, self._commit_index, 0)
            self._commit_written = self._commit_index
        if not self._buffer and not self._unsynced_written:
            return
        self._write_buffer()
        segment = self._segments[-1]
        records = self._records_unsynced
        self._records_unsynced = 0
        self._unsynced_written = False
        if self._fsync:
            started = time.perf_counter()
            try:
                os.fdatasync(self._fd)
            except OSError as exc:
                raise self._fail("fdatasync", exc) from exc
            elapsed = time.perf_counter() - started
            segment.synced_bytes = segment.written_bytes
            self.fsyncs += 1
            self.fsync_seconds_total += elapsed
            self.records_synced += records
            if self.on_sync is not None:
                self.on_sync(elapsed, records)
        self._drop_dead_segments()

    # -- test and status hooks ---------------------------------------------------------

    def segment_sizes(self) -> dict[str, tuple[int, int]]:
        """Each segment file's name -> (bytes known durable, bytes written to the file)."""
        return {s.path.name: (s.synced_bytes, s.written_bytes) for s in self._segments}

    @property
    def directory(self) -> Path:
        return self._dir

    def abandon(self) -> None:
        """Close the files writing nothing more, as a crash would (tests); the buffer is lost."""
        self._buffer.clear()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # -- internals -----------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _fail(self, what: str, exc: OSError) -> LogWriteFailed:
        if self._failure is None:
            self._failure = LogWriteFailed(what, exc)
            log.error("%s; the node must not acknowledge anything more", self._failure)
        return self._failure

    def _append(self, kind: int, index: int, term: int, data: bytes = b"") -> None:
        if self._failure is not None:
            # Keep memory as pysyncobj expects but write nothing more: sync() raises.
            return
        self._buffer += encode_record(kind, index, term, data)
        self._records_unsynced += 1
        if kind == ENTRY:
            # Before any rotation below: the record is in the buffer, which goes to the current segment.
            self._segments[-1].max_index = index
        if len(self._buffer) >= WRITE_BUFFER_BYTES_MAX:
            with contextlib.suppress(LogWriteFailed):  # remembered; sync() raises it
                self._write_buffer()
        if self._segments[-1].written_bytes + len(self._buffer) >= self._segment_bytes_max:
            with contextlib.suppress(LogWriteFailed):
                self._rotate()

    def _write_buffer(self) -> None:
        if not self._buffer:
            return
        try:
            _write_all(self._fd, self._buffer)
        except OSError as exc:
            raise self._fail("write", exc) from exc
        self._segments[-1].written_bytes += len(self._buffer)
        self._buffer.clear()
        self._unsynced_written = True

    def _rotate(self) -> None:
        """Start the next segment: the current one is made durable whole first, so only the last can be torn.

        Even with ``fsync=False``: a rotation is rare (every SEGMENT_BYTES_MAX, or a
        snapshot install), and a torn older segment would be refused as corruption.
        """
        self._check_usable()
        self._write_buffer()
        old = self._segments[-1]
        if old.synced_bytes != old.written_bytes:
            try:
                os.fdatasync(self._fd)
            except OSError as exc:
                raise self._fail("fdatasync", exc) from exc
        old.synced_bytes = old.written_bytes
        self._unsynced_written = False
        os.close(self._fd)
        self._fd = -1
        self._create_segment(old.seq + 1)

    def _create_segment(self, seq: int) -> None:
        path = self._dir / segment_name(seq)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        except OSError as exc:
            raise self._fail("segment create", exc) from exc
        self._fd = fd
        self._segments.append(_Segment(seq, path))
        try:
            _fsync_dir(self._dir)
        except OSError as exc:
            raise self._fail("directory fsync", exc) from exc
        self._buffer += SEGMENT_HEADER

    def _drop_dead_segments(self) -> None:
        """Delete old segments that hold nothing live any more (oldest first; never the active one)."""
        first_kept = self._entries[0][1] if self._entries else None
        doomed: list[_Segment] = []
        for segment in self._segments[:-1]:
            void = segment.seq < self._void_below_seq
            compacted = first_kept is not None and (segment.max_index is None or segment.max_index < first_kept)
            if not (void or compacted):
                break
            doomed.append(segment)
        if not doomed:
            return
        try:
            for segment in doomed:
                segment.path.unlink()
                self._segments.remove(segment)
            if self._fsync:
                _fsync_dir(self._dir)
        except OSError as exc:
            raise self._fail("segment delete", exc) from exc

    def _fsync_directory_of(self, path: Path) -> None:
        if self._fsync:
            _fsync_dir(path.parent)

    def _replay(self) -> LogImage:
        seqs: list[int] = []
        for name in os.listdir(self._dir):
            match = _SEGMENT_NAME.match(name)
            if match:
                seqs.append(int(match.group(1)))
        seqs.sort()
        for before, after in itertools.pairwise(seqs):
            if after != before + 1:
                raise LogCorrupted(self._dir / segment_name(before + 1), 0,
                                   f"segment missing between {segment_name(before)} and {segment_name(after)}")
        image = LogImage()
        for position, seq in enumerate(seqs):
            last = position == len(seqs) - 1
            path = self._dir / segment_name(seq)
            segment = _Segment(seq, path)
            data = path.read_bytes()
            if not last or not self._is_torn_creation(data):
                self._check_header(path, data)
                scan = scan_segment(data)
                if scan.bad_offset is not None:
                    self._torn_or_corrupt(path, data, scan, last)
                for record in scan.records:
                    if record.kind == ENTRY:
                        if record.index < 1 or (image.entries and record.index <= image.entries[-1][1]):
                            raise LogCorrupted(path, record.offset,
                                               f"entry index {record.index} does not follow the log")
                        segment.max_index = record.index
                    image.apply(record.kind, record.index, record.term, record.data)
                size = scan.valid_bytes
                if size != len(data):
                    self._truncate_tail(path, size, len(data))
            else:
                size = 0
                self._truncate_tail(path, 0, len(data))
            segment.written_bytes = segment.synced_bytes = size
            self._segments.append(segment)
        image.clamp_commit()
        if not self._segments:
            self._create_segment(0)
        else:
            active = self._segments[-1]
            try:
                self._fd = os.open(active.path, os.O_WRONLY | os.O_APPEND)
            except OSError as exc:
                raise self._fail("segment open", exc) from exc
            if active.written_bytes == 0:
                self._buffer += SEGMENT_HEADER
        return image

    @staticmethod
    def _is_torn_creation(data: bytes) -> bool:
        """A last segment whose header never reached the disk: shorter than a header, or zeros throughout."""
        return len(data) < len(SEGMENT_HEADER) or data.count(0) == len(data)

    @staticmethod
    def _check_header(path: Path, data: bytes) -> None:
        header = data[:len(SEGMENT_HEADER)]
        if header != SEGMENT_HEADER:
            if header[:5] == SEGMENT_HEADER[:5] and len(header) == len(SEGMENT_HEADER):
                raise LogCorrupted(path, 0, f"segment format version {header[-1]} is not {SEGMENT_HEADER[-1]}")
            raise LogCorrupted(path, 0, "bad segment header")

    def _torn_or_corrupt(self, path: Path, data: bytes, scan: SegmentScan, last: bool) -> None:
        assert scan.bad_offset is not None
        offset = scan.bad_offset
        if not last:
            raise LogCorrupted(path, offset, f"{scan.bad_why} in a segment that is not the last")
        if scan.bad_why.startswith("unknown record kind"):
            raise LogCorrupted(path, offset, scan.bad_why)
        after = _valid_record_after(data, offset)
        if after is not None:
            raise LogCorrupted(path, offset, f"{scan.bad_why}, followed by a valid record at offset {after}")

    def _truncate_tail(self, path: Path, size: int, was: int) -> None:
        if was == size:
            return
        log.warning("raft log: torn tail truncated: %s at byte offset %d, %d bytes dropped", path, size, was - size)
        self.torn_tails_truncated += 1
        fd = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, size)
            if self._fsync:
                # Durable before anything is appended after it, so old bytes cannot reappear behind new ones.
                os.fsync(fd)
        finally:
            os.close(fd)

    def _read_term(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self._dir / _TERM_TEMP).unlink()  # a write that never reached its rename
        path = self._dir / TERM_FILE
        try:
            body = path.read_bytes()
        except FileNotFoundError:
            return
        try:
            meta = msgpack.unpackb(body, raw=False)
        except Exception:
            meta = None
        if (not isinstance(meta, dict) or not isinstance(meta.get("term"), int) or isinstance(meta["term"], bool)
                or meta["term"] < 0):
            raise LogCorrupted(path, 0, "term file does not hold {term, voted_for}")
        self._term = meta["term"]
        self._voted_for = meta.get("voted_for")
