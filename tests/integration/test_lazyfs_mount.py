"""jepsen-lite's LazyFS harness against a real LazyFS mount: a power cut keeps exactly the fsynced bytes."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "jepsen-lite"))

from jepsenlite.lazyfs import (
    LAZYFS_BIN_DEFAULT,
    LazyFSError,
    LazyFSMount,
    clear_cache,
    cleared_count,
    remove_dead_mounts,
    why_lazyfs_unavailable,
)

REASON = why_lazyfs_unavailable(LAZYFS_BIN_DEFAULT)
pytestmark = [pytest.mark.integration, pytest.mark.skipif(REASON is not None, reason=f"LazyFS: {REASON}")]

#: A writer process: fsyncs a prefix, writes more without fsync, says so, then waits to be killed.
WRITER = textwrap.dedent("""
    import os, sys, time
    mnt = sys.argv[1]
    with open(os.path.join(mnt, "log"), "wb") as f:
        f.write(b"durable-" * 64)
        f.flush()
        os.fdatasync(f.fileno())
        f.write(b"volatile" * 64)
        f.flush()
        with open(os.path.join(mnt, "never-synced"), "wb") as g:
            g.write(b"gone" * 100)
        print("written", flush=True)
        time.sleep(60)
""")


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[LazyFSMount]:
    m = LazyFSMount(tmp_path / "disk", cache_mb=16)
    m.mount()
    try:
        yield m
    finally:
        assert m.unmount() == []
        assert not m.mounted


def _run_writer(mnt: Path) -> None:
    """Start the writer, wait until it has written, then kill -9 it (its file is still open)."""
    with subprocess.Popen([sys.executable, "-c", WRITER, str(mnt)], stdout=subprocess.PIPE) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"written\n"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()


def test_power_cut_keeps_exactly_the_fsynced_bytes(mount: LazyFSMount) -> None:
    _run_writer(mount.mnt)
    # Before the cut the unsynced bytes are there (from LazyFS's cache): the clear is what takes them.
    assert (mount.mnt / "log").read_bytes() == b"durable-" * 64 + b"volatile" * 64
    assert (mount.mnt / "never-synced").read_bytes() == b"gone" * 100
    # LazyFS counts whole dirty blocks: the log's one block (the volatile bytes and the durable ones before them)
    # and never-synced's.
    assert mount.unsynced_bytes() == len(b"durable-" * 64 + b"volatile" * 64) + len(b"gone" * 100)
    mount.clear_cache()
    assert mount.unsynced_bytes() == 0
    assert (mount.mnt / "log").read_bytes() == b"durable-" * 64
    assert (mount.mnt / "never-synced").read_bytes() == b""
    # The backing folder holds what survived, nothing more.
    assert (mount.root / "log").read_bytes() == b"durable-" * 64
    assert cleared_count(mount.log.read_text()) == 1


def test_clear_cache_from_other_processes_one_after_another(mount: LazyFSMount) -> None:
    # Each command comes from a process that opens the FIFO, writes and closes it; the mount's held writer
    # keeps LazyFS's reader alive, so the second and third are read too.
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; "
            "from jepsenlite.lazyfs import clear_cache; clear_cache(Path(sys.argv[2]), Path(sys.argv[3]))")
    lib = str(Path(__file__).resolve().parents[2] / "jepsen-lite")
    for n in (1, 2, 3):
        (mount.mnt / f"f{n}").write_bytes(b"x" * 10)
        subprocess.run([sys.executable, "-c", code, lib, str(mount.fifo), str(mount.log)], check=True, timeout=30)
        assert cleared_count(mount.log.read_text()) == n
        assert (mount.mnt / f"f{n}").read_bytes() == b""


def test_unmount_is_idempotent_and_ends_lazyfs(tmp_path: Path) -> None:
    m = LazyFSMount(tmp_path / "disk", cache_mb=16)
    m.mount()
    assert m.mounted
    assert m.unmount() == []
    assert not m.mounted
    assert m.unmount() == []
    # Nobody reads the FIFO any more: a clear-cache says so at once instead of hanging.
    with pytest.raises(LazyFSError, match="LazyFS is not running"):
        clear_cache(m.fifo, m.log, deadline_s=1.0)
    with pytest.raises(LazyFSError, match="not mounted"):
        m.clear_cache()


def test_unmount_of_a_busy_mount_is_lazy_and_reported(tmp_path: Path) -> None:
    m = LazyFSMount(tmp_path / "disk", cache_mb=16)
    m.mount()
    holder = subprocess.Popen(["sleep", "60"], cwd=m.mnt)  # its working directory keeps the mount busy
    try:
        problems = m.unmount(deadline_s=2.0)
    finally:
        holder.kill()
        holder.wait()
    assert any("unmounted lazily" in p for p in problems), problems
    assert not m.mounted


def test_a_lazyfs_that_cannot_start_leaves_nothing_mounted(tmp_path: Path) -> None:
    m = LazyFSMount(tmp_path / "disk", Path("/bin/false"), cache_mb=16)
    with pytest.raises(LazyFSError, match="exited with 1"):
        m.mount()
    assert not m.mounted
    assert m.unmount() == []


def test_mounting_twice_is_refused(mount: LazyFSMount) -> None:
    with pytest.raises(LazyFSError, match="already mounted"):
        mount.mount()
    other = LazyFSMount(mount.base, cache_mb=16)
    with pytest.raises(LazyFSError, match="already a mount point"):
        other.mount()
    assert mount.mounted
    assert os.listdir(mount.mnt) == []


def test_mounts_of_a_killed_lazyfs_are_detached_and_live_ones_kept(tmp_path: Path, mount: LazyFSMount) -> None:
    dead = LazyFSMount(tmp_path / "dead", cache_mb=16)
    dead.mount()
    try:
        assert dead._proc is not None
        dead._proc.kill()  # what a runner killed with kill -9 leaves: a mount nobody serves
        dead._proc.wait()
        with pytest.raises(OSError) as err:
            os.stat(dead.mnt)
        assert err.value.errno == errno.ENOTCONN
        assert str(dead.mnt) in remove_dead_mounts()
        assert not dead.mounted
        assert mount.mounted and str(mount.mnt) not in remove_dead_mounts()
    finally:
        dead.unmount()
