"""RaftLog: replay equals what was written, torn tails are cut, corruption is refused, crashes keep synced entries.

Real files in tmp_path throughout; a "crash" is ``abandon()`` (nothing more
is written, the write buffer is lost) plus cutting each file back to any
length between what was fsynced and what was written.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from registry.raft.log import (
    COMMIT,
    ENTRY,
    FIRST,
    RESET,
    SEGMENT_HEADER,
    TERM_FILE,
    TRUNCATE,
    LogCorrupted,
    LogImage,
    LogWriteFailed,
    RaftLog,
    encode_record,
    scan_segment,
    segment_name,
)

Entry = tuple[bytes, int, int]


def entries_of(rl: RaftLog) -> list[Entry]:
    return list(rl[:])


def fill(rl: RaftLog, first: int, count: int, term: int = 1) -> None:
    for idx in range(first, first + count):
        rl.add(b"cmd-%d" % idx, idx, term)


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


def reopen(directory: Path, **kwargs: int) -> RaftLog:
    return RaftLog(directory, **kwargs)  # type: ignore[arg-type]


# -- the pure parts ----------------------------------------------------------------------

@pytest.mark.parametrize(("records", "entries", "commit"), [
    ([], [], 1),
    ([(ENTRY, 1, 1, b"a"), (ENTRY, 2, 1, b"b")], [(b"a", 1, 1), (b"b", 2, 1)], 1),
    ([(ENTRY, 1, 1, b"a"), (ENTRY, 2, 1, b"b"), (TRUNCATE, 2, 0, b"")], [(b"a", 1, 1)], 1),
    ([(ENTRY, 1, 1, b"a"), (ENTRY, 2, 1, b"b"), (FIRST, 2, 0, b"")], [(b"b", 2, 1)], 1),
    ([(ENTRY, 1, 1, b"a"), (ENTRY, 2, 1, b"b"), (FIRST, 3, 0, b"")], [], 1),
    ([(ENTRY, 1, 1, b"a"), (RESET, 0, 0, b""), (ENTRY, 7, 2, b"s")], [(b"s", 7, 2)], 1),
    # The commit index is clamped to the entries present when it is read, and by later truncations.
    ([(ENTRY, 1, 1, b"a"), (COMMIT, 5, 0, b"")], [(b"a", 1, 1)], 1),
    ([(ENTRY, 1, 1, b"a"), (ENTRY, 2, 1, b"b"), (ENTRY, 3, 1, b"c"), (COMMIT, 3, 0, b""), (TRUNCATE, 3, 0, b"")],
     [(b"a", 1, 1), (b"b", 2, 1)], 2),
    ([(ENTRY, 1, 1, b"a"), (ENTRY, 2, 1, b"b"), (COMMIT, 2, 0, b""), (RESET, 0, 0, b""), (ENTRY, 9, 3, b"x"),
      (ENTRY, 10, 3, b"y")], [(b"x", 9, 3), (b"y", 10, 3)], 1),
    ([(ENTRY, 9, 3, b"x"), (ENTRY, 10, 3, b"y"), (COMMIT, 10, 0, b"")], [(b"x", 9, 3), (b"y", 10, 3)], 10),
])
def test_log_image_applies_records(records: list[tuple[int, int, int, bytes]], entries: list[Entry],
                                   commit: int) -> None:
    image = LogImage()
    for record in records:
        image.apply(*record)
    assert image.entries == entries
    assert image.commit_index == commit


@pytest.mark.parametrize(("tail", "records", "bad_why"), [
    (b"", 2, ""),
    (b"\x00" * 3, 2, "record header runs past the end of the file"),
    (b"\x00" * 30, 2, "record length 0 out of range"),
    (encode_record(ENTRY, 3, 1, b"c")[:-1], 2, "record runs past the end of the file"),
    (encode_record(ENTRY, 3, 1, b"c")[:-1] + b"d", 2, "record CRC mismatch"),
    (encode_record(99, 3, 1, b"c"), 2, "unknown record kind 99"),
])
def test_scan_segment_stops_at_the_first_unreadable_record(tail: bytes, records: int, bad_why: str) -> None:
    good = SEGMENT_HEADER + encode_record(ENTRY, 1, 1, b"a") + encode_record(ENTRY, 2, 1, b"b")
    scan = scan_segment(good + tail)
    assert len(scan.records) == records
    assert scan.valid_bytes == len(good)
    assert scan.bad_why == bad_why
    assert scan.bad_offset == (None if not bad_why else len(good))


# -- round trips -------------------------------------------------------------------------------

def test_round_trip_entries_commit_term_and_vote(tmp_path: Path) -> None:
    rl = RaftLog(tmp_path / "log")
    fill(rl, 1, 10)
    rl.setRaftCommitIndex(7)
    rl.setCurrentTerm(3, "127.0.0.1:9000")
    assert rl.dirty
    rl.sync()
    assert not rl.dirty
    expected = entries_of(rl)
    rl._destroy()
    again = reopen(tmp_path / "log")
    assert entries_of(again) == expected
    assert again.getRaftCommitIndex() == 7
    assert again.getCurrentTerm() == 3
    assert again.getVotedForNodeId() == "127.0.0.1:9000"
    assert again.torn_tails_truncated == 0
    again._destroy()


def test_a_new_log_is_empty_with_pysyncobj_defaults(tmp_path: Path) -> None:
    rl = RaftLog(tmp_path / "log")
    assert len(rl) == 0
    assert (rl.getRaftCommitIndex(), rl.getCurrentTerm(), rl.getVotedForNodeId()) == (1, 0, None)
    rl._destroy()


def test_positions_are_relative_to_the_first_entry_held(tmp_path: Path) -> None:
    rl = RaftLog(tmp_path / "log")
    fill(rl, 1, 10)
    rl.deleteEntriesTo(4)  # drops indexes 1..4
    assert rl[0][1] == 5
    rl.deleteEntriesFrom(3)  # drops indexes 8..10
    assert [e[1] for e in rl[:]] == [5, 6, 7]
    assert rl[1:2] == [(b"cmd-6", 6, 1)]
    assert len(rl) == 3
    rl.sync()
    rl._destroy()
    assert [e[1] for e in reopen(tmp_path / "log")[:]] == [5, 6, 7]


def test_commit_index_is_written_only_by_sync(tmp_path: Path) -> None:
    rl = RaftLog(tmp_path / "log")
    fill(rl, 1, 5)
    rl.sync()
    rl.setRaftCommitIndex(5)
    assert rl.dirty
    rl.abandon()  # the commit index never reached the file
    assert reopen(tmp_path / "log").getRaftCommitIndex() == 1


def test_sync_counts_fsyncs_and_is_a_no_op_when_clean(tmp_path: Path) -> None:
    seen: list[tuple[float, int]] = []
    rl = RaftLog(tmp_path / "log", on_sync=lambda seconds, records: seen.append((seconds, records)))
    fill(rl, 1, 3)
    rl.sync()
    rl.sync()
    assert rl.fsyncs == 1
    assert len(seen) == 1 and seen[0][1] == 3 and seen[0][0] >= 0
    assert rl.records_synced == 3
    rl.setRaftCommitIndex(2)
    rl.sync()  # the COMMIT record alone
    assert rl.fsyncs == 2 and seen[-1][1] == 1
    rl._destroy()


def test_unsafe_no_fsync_writes_but_never_fsyncs(tmp_path: Path) -> None:
    rl = RaftLog(tmp_path / "log", fsync=False)
    fill(rl, 1, 3)
    rl.sync()
    assert rl.fsyncs == 0
    assert not rl.dirty
    rl.abandon()
    assert len(reopen(tmp_path / "log")) == 3  # written, so it survives a process crash


# -- torn tails ----------------------------------------------------------------------------------

def synced_log(directory: Path, count: int, **kwargs: int) -> list[Entry]:
    rl = RaftLog(directory, **kwargs)  # type: ignore[arg-type]
    fill(rl, 1, count)
    rl.sync()
    expected = entries_of(rl)
    rl._destroy()
    return expected


def test_torn_tail_at_every_byte_offset_of_the_last_record(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    expected = synced_log(directory, 5)
    (segment,) = segment_files(directory)
    whole = segment.read_bytes()
    last_start = len(whole) - len(encode_record(ENTRY, 5, 1, b"cmd-5"))
    for cut in range(last_start, len(whole)):
        segment.write_bytes(whole[:cut])
        rl = reopen(directory)
        assert entries_of(rl) == expected[:4], cut
        assert rl.torn_tails_truncated == (0 if cut == last_start else 1), cut
        assert segment.stat().st_size == last_start
        # It keeps appending after the cut.
        rl.add(b"again", 5, 2)
        rl.sync()
        rl._destroy()
        assert entries_of(reopen(directory))[-1] == (b"again", 5, 2)


def test_truncation_at_every_length_gives_a_prefix(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    expected = synced_log(directory, 6)
    (segment,) = segment_files(directory)
    whole = segment.read_bytes()
    for cut in range(len(whole) + 1):
        segment.write_bytes(whole[:cut])
        rl = reopen(directory)
        got = entries_of(rl)
        assert got == expected[:len(got)], cut
        rl._destroy()


def test_zeros_after_the_last_record_are_a_torn_tail(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    expected = synced_log(directory, 3)
    (segment,) = segment_files(directory)
    with segment.open("ab") as f:
        f.write(b"\x00" * 4096)
    rl = reopen(directory)
    assert entries_of(rl) == expected
    assert rl.torn_tails_truncated == 1
    rl._destroy()


def test_a_last_segment_whose_header_never_landed_is_started_again(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    expected = synced_log(directory, 3)
    for garbage in (b"", b"RRL", b"\x00" * 8, b"\x00" * 100):
        (directory / segment_name(1)).write_bytes(garbage)
        rl = reopen(directory)
        assert entries_of(rl) == expected
        rl.add(b"x", 4, 1)
        rl.sync()
        rl._destroy()
        assert entries_of(reopen(directory))[-1] == (b"x", 4, 1)
        (directory / segment_name(1)).unlink()
        # Take the entry back out for the next round: it lived in the segment just removed.


# -- corruption ------------------------------------------------------------------------------------

def test_bit_flips_never_yield_a_wrong_entry(tmp_path: Path) -> None:
    """Every bit of a two-segment log: the clear error, or a prefix (only if the flip is in the last record)."""
    directory = tmp_path / "log"
    rl = RaftLog(directory, segment_bytes_max=200)
    fill(rl, 1, 9)
    rl.setRaftCommitIndex(9)
    rl.sync()
    expected = entries_of(rl)
    rl._destroy()
    files = segment_files(directory)
    assert len(files) == 2
    assert [r.kind for r in scan_segment(files[-1].read_bytes()).records] == [ENTRY, ENTRY, COMMIT]
    last_file = files[-1]
    originals = {f: f.read_bytes() for f in files}
    last_record_start = scan_segment(originals[last_file]).records[-1].offset
    outcomes = {"corrupt": 0, "prefix": 0}
    for path, data in originals.items():
        for offset in range(len(data)):
            for bit in range(8):
                flipped = bytearray(data)
                flipped[offset] ^= 1 << bit
                path.write_bytes(bytes(flipped))
                try:
                    got = reopen(directory)
                except LogCorrupted as exc:
                    outcomes["corrupt"] += 1
                    message = str(exc)
                    assert str(path) in message and "\n" not in message
                    assert f"offset {exc.offset}" in message
                else:
                    outcomes["prefix"] += 1
                    entries = entries_of(got)
                    assert path == last_file and offset >= last_record_start, (path.name, offset, bit)
                    assert entries == expected[:len(entries)] and len(entries) >= len(expected) - 1
                    assert got.getRaftCommitIndex() <= entries[-1][1]
                    got.abandon()
                path.write_bytes(data)
                for other, content in originals.items():  # a truncated tail must not leak into the next case
                    if other.read_bytes() != content:
                        other.write_bytes(content)
    assert outcomes["corrupt"] > 0 and outcomes["prefix"] > 0


@pytest.mark.parametrize("where", ["first record", "middle record"])
def test_a_bad_record_followed_by_a_good_one_refuses_to_open(tmp_path: Path, where: str) -> None:
    directory = tmp_path / "log"
    synced_log(directory, 5)
    (segment,) = segment_files(directory)
    data = bytearray(segment.read_bytes())
    records = scan_segment(bytes(data)).records
    victim = records[0] if where == "first record" else records[2]
    data[victim.offset + 12] ^= 0xFF
    segment.write_bytes(bytes(data))
    with pytest.raises(LogCorrupted) as caught:
        reopen(directory)
    assert caught.value.offset == victim.offset
    assert str(segment) in str(caught.value)


def test_a_short_segment_that_is_not_the_last_is_corruption(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    synced_log(directory, 10, segment_bytes_max=100)
    first = segment_files(directory)[0]
    first.write_bytes(first.read_bytes()[:-3])
    with pytest.raises(LogCorrupted, match="not the last"):
        reopen(directory)


@pytest.mark.parametrize(("header", "why"), [
    (b"XXXXXXXX", "bad segment header"),
    (b"RRLOG\x00\x00\x07", "format version 7"),
])
def test_a_bad_header_is_corruption(tmp_path: Path, header: bytes, why: str) -> None:
    directory = tmp_path / "log"
    synced_log(directory, 3)
    (segment,) = segment_files(directory)
    segment.write_bytes(header + segment.read_bytes()[8:])
    with pytest.raises(LogCorrupted, match=why):
        reopen(directory)


def test_a_missing_segment_is_corruption(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    synced_log(directory, 12, segment_bytes_max=100)
    files = segment_files(directory)
    assert len(files) >= 3
    files[1].unlink()
    with pytest.raises(LogCorrupted, match="segment missing"):
        reopen(directory)


def test_an_entry_index_that_goes_backwards_is_corruption(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    directory.mkdir()
    (directory / segment_name(0)).write_bytes(
        SEGMENT_HEADER + encode_record(ENTRY, 5, 1, b"a") + encode_record(ENTRY, 5, 1, b"b"))
    with pytest.raises(LogCorrupted, match="does not follow"):
        reopen(directory)


# -- compaction and snapshot install -----------------------------------------------------------------

def cut_to_synced(directory: Path, sizes: dict[str, tuple[int, int]]) -> None:
    for name, (synced, _written) in sizes.items():
        path = directory / name
        if path.exists():
            os.truncate(path, synced)


def test_compaction_deletes_whole_old_segments_after_the_sync(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    rl = RaftLog(directory, segment_bytes_max=100)
    fill(rl, 1, 20)
    rl.sync()
    before = segment_files(directory)
    rl.deleteEntriesTo(15)  # keeps 16..20
    assert segment_files(directory) == before  # nothing deleted before FIRST is durable
    rl.sync()
    after = segment_files(directory)
    assert 0 < len(after) < len(before)
    rl._destroy()
    assert [e[1] for e in reopen(directory)[:]] == list(range(16, 21))


def test_replay_after_a_compaction_that_stopped_halfway(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    rl = RaftLog(directory, segment_bytes_max=100)
    fill(rl, 1, 20)
    rl.sync()
    full = entries_of(rl)
    rl.deleteEntriesTo(15)
    compacted = entries_of(rl)
    # FIRST written but not durable: a crash keeps any length between synced and written.
    pre_sync = tmp_path / "pre-sync"
    rl._write_buffer()
    shutil.copytree(directory, pre_sync)
    sizes = rl.segment_sizes()
    rl.sync()
    doomed = sorted(set(os.listdir(pre_sync)) - set(os.listdir(directory)))
    assert doomed
    rl._destroy()
    # FIRST not durable: nothing was deleted yet, and the old entries come back (compaction is redone later).
    lost_first = tmp_path / "lost-first"
    shutil.copytree(pre_sync, lost_first)
    cut_to_synced(lost_first, sizes)
    assert entries_of(reopen(lost_first)) == full
    # FIRST durable, and any prefix of the doomed segments deleted before the crash.
    for deleted in range(len(doomed) + 1):
        case = tmp_path / f"deleted-{deleted}"
        shutil.copytree(pre_sync, case)
        for name in doomed[:deleted]:
            (case / name).unlink()
        assert entries_of(reopen(case)) == compacted, deleted


def test_clear_starts_a_new_segment_and_drops_the_old_after_sync(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    rl = RaftLog(directory, segment_bytes_max=100)
    fill(rl, 1, 12)
    rl.sync()
    old = segment_files(directory)
    rl.clear()
    rl.add(b"snap-1", 40, 3)
    rl.add(b"snap", 41, 3)
    rl.setRaftCommitIndex(41)
    sizes = rl.segment_sizes()
    rl._write_buffer()
    crashed = tmp_path / "crashed"
    shutil.copytree(directory, crashed)
    rl.sync()
    assert not set(old) & set(segment_files(directory))
    rl._destroy()
    again = reopen(directory)
    assert entries_of(again) == [(b"snap-1", 40, 3), (b"snap", 41, 3)]
    assert again.getRaftCommitIndex() == 41
    # A crash before that sync: the RESET may be lost, and then the old log is back, whole.
    cut_to_synced(crashed, sizes)
    assert [e[1] for e in reopen(crashed)[:]] == list(range(1, 13))


# -- term and vote -------------------------------------------------------------------------------------

def test_term_file_round_trip_and_a_torn_temp_file(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    rl = RaftLog(directory)
    rl.setCurrentTerm(4, "a:1")
    rl.setCurrentTerm(5, None)
    rl._destroy()
    assert msgpack.unpackb((directory / TERM_FILE).read_bytes()) == {"term": 5, "voted_for": None}
    # A crash while writing the next one leaves a torn temp file: ignored, and removed.
    (directory / (TERM_FILE + ".tmp")).write_bytes(msgpack.packb({"term": 6})[:3])
    again = reopen(directory)
    assert (again.getCurrentTerm(), again.getVotedForNodeId()) == (5, None)
    assert not (directory / (TERM_FILE + ".tmp")).exists()
    again._destroy()


@pytest.mark.parametrize("body", [b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"term": "5"}),
                                  msgpack.packb({"term": -1}), msgpack.packb({"voted_for": "a"})])
def test_a_damaged_term_file_is_corruption(tmp_path: Path, body: bytes) -> None:
    directory = tmp_path / "log"
    RaftLog(directory)._destroy()
    (directory / TERM_FILE).write_bytes(body)
    with pytest.raises(LogCorrupted, match=TERM_FILE):
        reopen(directory)


# -- I/O errors ------------------------------------------------------------------------------------------

@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_fails_the_log_for_good(small_tmpfs: Path) -> None:
    rl = RaftLog(small_tmpfs / "log")
    fill(rl, 1, 3)
    rl.sync()
    durable = entries_of(rl)
    blob = b"x" * 4096
    with pytest.raises(LogWriteFailed, match="ENOSPC"):
        for idx in range(4, 100):
            rl.add(blob, idx, 1)
            rl.sync()
    assert rl.failed is not None
    with pytest.raises(LogWriteFailed):
        rl.sync()  # and every later sync: nothing more is acknowledged
    with pytest.raises(LogWriteFailed):
        rl.setCurrentTerm(9, "a:1")
    rl.abandon()
    # On restart the log replays to what reached the disk, cutting the torn tail (which frees space too).
    again = reopen(small_tmpfs / "log")
    got = entries_of(again)
    assert got[:len(durable)] == durable
    assert all(entry[0] == blob for entry in got[len(durable):])
    again._destroy()


# -- crashes at any point --------------------------------------------------------------------------------

OPS = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(1, 3), st.integers(0, 40)),
    st.tuples(st.just("delete_from"), st.integers(0, 12)),
    st.tuples(st.just("delete_to"), st.integers(0, 12)),
    st.tuples(st.just("clear")),
    st.tuples(st.just("commit"), st.integers(0, 60)),
    st.tuples(st.just("sync")),
    st.tuples(st.just("term"), st.integers(0, 5)),
), max_size=40)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS, segment_bytes_max=st.sampled_from([60, 150, 1 << 20]), cut=st.randoms(use_true_random=False))
def test_a_crash_anywhere_replays_to_a_state_holding_everything_synced(
        tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[object, ...]], segment_bytes_max: int,
        cut: object) -> None:
    import random
    assert isinstance(cut, random.Random)
    directory = tmp_path_factory.mktemp("crash") / "log"
    rl = RaftLog(directory, segment_bytes_max=segment_bytes_max)
    next_index = 1
    #: Every entry list the log held since the last sync: a crash must replay to one of them.
    since_sync: list[list[Entry]] = [[]]
    term = 0
    for op in ops:
        kind = op[0]
        if kind == "add":
            count, size = op[1], op[2]
            assert isinstance(count, int) and isinstance(size, int)
            for _ in range(count):
                rl.add(bytes([next_index % 256]) * size, next_index, term)
                next_index += 1
                since_sync.append(entries_of(rl))
        elif kind == "delete_from" and isinstance(op[1], int):
            rl.deleteEntriesFrom(min(op[1], len(rl)))
            next_index = rl[-1][1] + 1 if len(rl) else next_index
        elif kind == "delete_to" and isinstance(op[1], int):
            rl.deleteEntriesTo(op[1] if op[1] < len(rl) else len(rl))
        elif kind == "clear":
            rl.clear()
            next_index += 5  # a snapshot jumps ahead
        elif kind == "commit" and isinstance(op[1], int):
            last = rl[-1][1] if len(rl) else 1
            rl.setRaftCommitIndex(min(op[1], last))
        elif kind == "sync":
            rl.sync()
            since_sync = []
        elif kind == "term" and isinstance(op[1], int):
            term += op[1]
            rl.setCurrentTerm(term, None)
        since_sync.append(entries_of(rl))
    sizes = rl.segment_sizes()
    rl.abandon()
    for name, (synced, written) in sizes.items():
        assert os.path.getsize(directory / name) == written
        os.truncate(directory / name, cut.randint(synced, written))
    again = RaftLog(directory, segment_bytes_max=segment_bytes_max)
    got = entries_of(again)
    assert got in since_sync
    last = got[-1][1] if got else 1
    assert again.getRaftCommitIndex() <= last
    assert again.getCurrentTerm() == term
    again._destroy()
