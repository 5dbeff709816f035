"""LazyFS: a disk that forgets, on command, every byte that was not fsynced.

LazyFS (INESC TEC / University of Minho; built from ``shared/tools/lazyfs``)
is a FUSE file system that keeps every write in its own cache and writes it
to the folder underneath only on fsync.  Writing ``lazyfs::clear-cache`` to
its command FIFO drops everything unsynced in every file of the mount; files
that were created, renamed or deleted stay so.  Kill every process using the
mount, clear the cache, start them again: that is a power cut.

What this module holds, and why each rule is here (all checked on this
machine, see ``shared/tools/lazyfs/README.md``):

* One :class:`LazyFSMount` per disk: a config file, the backing folder
  (``root``), the mount point (``mnt``), the FIFO and LazyFS's log, all under
  one scratch folder that the caller owns.  A stale FIFO is removed before
  mounting, since it can still hold an old command.
* The mount keeps one writer open on the FIFO for its whole life.  LazyFS's
  command reader stops for good at end-of-file, which a FIFO reports as
  soon as its last writer closes; a held writer means a command written
  later by another process (``clear_cache``) is still read.
* LazyFS reads at most 100 bytes per ``read`` and takes the whole read as
  one command, so two commands written back to back can arrive glued
  together and be ignored.  So each command (``clear_cache``,
  ``unsynced_bytes``) is sent alone, and its sender waits, with a deadline,
  until LazyFS's log shows the answer before anyone sends the next.
  (LazyFS's "completed" FIFO would say when a clear is done too, but it
  blocks LazyFS until someone reads it: not used.)
* The config file is named relative to LazyFS's working directory: LazyFS
  ignores a ``--config-path`` that contains ``-o`` anywhere, in any case
  (it takes it for the next option), and pytest's folders are named
  ``/tmp/pytest-of-root/...``.
* Unmount always runs (``fusermount3 -u``; if the mount is busy or its
  daemon is gone, a lazy unmount), then the LazyFS process is reaped.
* Mounts are found in ``/proc/self/mountinfo``, not with
  ``os.path.ismount``: a mount whose daemon died answers ``ENOTCONN`` and
  looks unmounted to ``ismount``, but still has to be unmounted.

LazyFS needs ``/dev/fuse`` and root; :func:`why_lazyfs_unavailable` says
what is missing so that callers can skip with that reason.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

__all__ = [
    "LAZYFS_BIN_DEFAULT",
    "LazyFSError",
    "LazyFSMount",
    "clear_cache",
    "cleared_count",
    "config_toml",
    "lazyfs_mount_points",
    "mounted_paths",
    "remove_dead_mounts",
    "unavailable_reason",
    "unsynced_bytes",
    "unsynced_reports",
    "why_lazyfs_unavailable",
]

#: Where ``.ci/run`` builds LazyFS (``shared/tools/lazyfs/build.sh /opt/lazyfs``).
LAZYFS_BIN_DEFAULT = Path("/opt/lazyfs/lazyfs")
CLEAR_CACHE_COMMAND = b"lazyfs::clear-cache\n"
UNSYNCED_REPORT_COMMAND = b"lazyfs::unsynced-data-report\n"
#: How LazyFS ends an unsynced-data report: nothing unsynced, or a total.  It counts the byte ranges of dirty
#: blocks, so a block that was partly fsynced counts whole: an upper bound of what a clear drops.
_REPORT_END = re.compile(r"report: all data blocks are synced!|report: total number of bytes un-fsynced: (\d+) bytes")
#: What LazyFS logs (at warning level, flushed at once) when a clear-cache has finished.
CLEARED_MARK = "cache is cleared"
#: What LazyFS logs once its command reader has opened the FIFO.
READY_MARK = "waiting for fault commands"
#: LazyFS's cache of one mount, in MiB.  With eviction off, unsynced data can never reach the disk behind
#: our back (an evicted dirty page would be written out), but a full cache fails writes: every byte a run
#: writes to one mount must fit.  A jepsen-lite run writes a few MiB per node.
CACHE_MB_DEFAULT = 256
#: LazyFS mounts in well under a second here; the deadline covers a loaded machine.
MOUNT_DEADLINE_S = 15.0
#: A clear-cache takes milliseconds; the deadline covers a loaded machine.
CLEAR_DEADLINE_S = 10.0
UNMOUNT_DEADLINE_S = 10.0
POLL_S = 0.02
#: How much of LazyFS's own output an error quotes.
LOG_TAIL_CHARS = 1500


class LazyFSError(RuntimeError):
    """LazyFS did not mount, clear or unmount as asked; the message says which mount and why."""


def unavailable_reason(*, dev_fuse: bool, root: bool, binary: Path, binary_found: bool,
                       fusermount_found: bool) -> str | None:
    """Why LazyFS cannot run, from the facts of this machine, or None.  Pure."""
    if not dev_fuse:
        return "LazyFS needs FUSE: /dev/fuse is missing (no FUSE in this kernel or container)"
    if not root:
        return "LazyFS needs root (it mounts a FUSE file system with allow_other)"
    if not binary_found:
        return (f"LazyFS is not built: {binary} is missing "
                f"(build it: shared/tools/lazyfs/build.sh {binary.parent}, as root)")
    if not fusermount_found:
        return "fusermount3 is missing (apt-get install fuse3)"
    return None


def why_lazyfs_unavailable(binary: Path = LAZYFS_BIN_DEFAULT) -> str | None:
    """Why LazyFS cannot run on this machine (for a skip reason), or None if it can."""
    return unavailable_reason(dev_fuse=os.path.exists("/dev/fuse"), root=os.geteuid() == 0, binary=binary,
                              binary_found=binary.is_file() and os.access(binary, os.X_OK),
                              fusermount_found=shutil.which("fusermount3") is not None)


def _toml_string(value: str) -> str:
    # A TOML basic string: quote and backslash are the characters that need escaping in our paths.
    if any(ch in value for ch in "\n\r\t"):
        raise LazyFSError(f"control character in a LazyFS path: {value!r}")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def config_toml(fifo: Path, logfile: Path, cache_mb: int) -> str:
    """LazyFS's config for one mount.  Pure.

    No ``fifo_path_completed``: LazyFS would block opening it until a reader
    holds it.  Paths must be absolute: LazyFS runs them as given.
    """
    if not fifo.is_absolute() or not logfile.is_absolute():
        raise LazyFSError(f"LazyFS needs absolute paths: {fifo}, {logfile}")
    if cache_mb < 1:
        raise LazyFSError(f"cache_mb must be positive, not {cache_mb}")
    return (
        "[faults]\n"
        f"fifo_path={_toml_string(str(fifo))}\n"
        "[cache]\n"
        "apply_eviction=false\n"
        "[cache.simple]\n"
        f'custom_size="{cache_mb}mb"\n'
        "blocks_per_page=1\n"
        "[filesystem]\n"
        "log_all_operations=false\n"
        f"logfile={_toml_string(str(logfile))}\n"
    )


def cleared_count(log_text: str) -> int:
    """How many clear-cache commands LazyFS has finished, from its log.  Pure."""
    return log_text.count(CLEARED_MARK)


def unsynced_reports(log_text: str) -> list[int]:
    """The totals of every unsynced-data report in LazyFS's log, in order (0: all synced).  Pure."""
    return [int(m.group(1) or 0) for m in _REPORT_END.finditer(log_text)]


def _unescape_mountinfo(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in mount points as 3-digit octal escapes.
    out, i = [], 0
    while i < len(field):
        digits = field[i + 1:i + 4]
        if field[i] == "\\" and len(digits) == 3 and all(d in "01234567" for d in digits):
            out.append(chr(int(digits, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounted_paths(mountinfo: str) -> set[str]:
    """Mount points listed in a ``/proc/<pid>/mountinfo`` text (field 5).  Pure."""
    paths = set()
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if len(fields) > 4:
            paths.add(_unescape_mountinfo(fields[4]))
    return paths


def lazyfs_mount_points(mountinfo: str) -> list[str]:
    """Mount points of LazyFS file systems (type ``fuse.lazyfs``) in a mountinfo text.  Pure."""
    points = []
    for line in mountinfo.splitlines():
        fields, _, rest = line.partition(" - ")
        parts = fields.split(" ")
        if len(parts) > 4 and rest.split(" ")[0] == "fuse.lazyfs":
            points.append(_unescape_mountinfo(parts[4]))
    return points


def remove_dead_mounts() -> list[str]:
    """Detach LazyFS mounts whose LazyFS is gone (a run killed with kill -9); return their mount points.

    Such a mount answers every access with ENOTCONN and keeps its folder from
    being removed.  Live mounts (of runs still going) are left alone.
    """
    removed = []
    for point in lazyfs_mount_points(_read_text(Path("/proc/self/mountinfo"))):
        try:
            os.stat(point)
            continue
        except OSError as err:
            if err.errno != errno.ENOTCONN:
                continue
        subprocess.run(["fusermount3", "-u", "-z", point], capture_output=True, timeout=UNMOUNT_DEADLINE_S)
        removed.append(point)
    return removed


def _is_mounted(path: Path) -> bool:
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return os.path.ismount(path)
    return str(path) in mounted_paths(text)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _command(fifo: Path, logfile: Path, command: bytes, count: Callable[[str], int], deadline_s: float) -> str:
    """Send one command and wait until ``count(log)`` grows (LazyFS logged the answer); return the log.

    Any process may call this while the mount's owner holds its writer open.
    Callers must not send commands to one mount concurrently (see the module
    docstring: LazyFS can read two commands as one).
    """
    before = count(_read_text(logfile))
    name = command.decode().strip()
    try:
        # Non-blocking: with no reader (LazyFS gone), open fails at once with ENXIO instead of hanging.
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as err:
        reason = "LazyFS is not running" if err.errno == errno.ENXIO else err.strerror
        raise LazyFSError(f"cannot send {name} to {fifo}: {reason}") from None
    try:
        os.write(fd, command)
    finally:
        os.close(fd)
    end = time.monotonic() + deadline_s
    while True:
        text = _read_text(logfile)
        if count(text) > before:
            return text
        if time.monotonic() > end:
            raise LazyFSError(f"LazyFS did not answer {name} within {deadline_s:g}s "
                              f"(log {logfile}: {text[-LOG_TAIL_CHARS:]!r})")
        time.sleep(POLL_S)


def clear_cache(fifo: Path, logfile: Path, deadline_s: float = CLEAR_DEADLINE_S) -> None:
    """Drop every unsynced byte on one LazyFS mount; return once LazyFS's log says it is done."""
    _command(fifo, logfile, CLEAR_CACHE_COMMAND, cleared_count, deadline_s)


def unsynced_bytes(fifo: Path, logfile: Path, deadline_s: float = CLEAR_DEADLINE_S) -> int:
    """How many bytes a clear would drop now, as LazyFS counts them (whole dirty blocks)."""
    text = _command(fifo, logfile, UNSYNCED_REPORT_COMMAND, lambda t: len(unsynced_reports(t)), deadline_s)
    return unsynced_reports(text)[-1]


class LazyFSMount:
    """One LazyFS mount under ``base``: ``mount``, ``clear_cache``, ``unmount`` (idempotent).

    Layout: ``base/mnt`` (where programs write), ``base/root`` (the backing
    folder, holding only what was fsynced, or was never cached), ``base/faults.fifo``,
    ``base/lazyfs.log`` (LazyFS's log, which ``clear_cache`` reads),
    ``base/lazyfs.out`` (its console), ``base/lazyfs.toml``.
    """

    def __init__(self, base: Path, binary: Path = LAZYFS_BIN_DEFAULT, *, cache_mb: int = CACHE_MB_DEFAULT) -> None:
        self.base = base.resolve()
        self.binary = binary
        self.cache_mb = cache_mb
        self.mnt = self.base / "mnt"
        self.root = self.base / "root"
        self.fifo = self.base / "faults.fifo"
        self.log = self.base / "lazyfs.log"
        self.console = self.base / "lazyfs.out"
        self.config = self.base / "lazyfs.toml"
        self._proc: subprocess.Popen[bytes] | None = None
        self._writer: int | None = None

    @property
    def mounted(self) -> bool:
        return _is_mounted(self.mnt)

    def _tail(self) -> str:
        return (_read_text(self.console) + _read_text(self.log))[-LOG_TAIL_CHARS:]

    def mount(self, deadline_s: float = MOUNT_DEADLINE_S) -> None:
        """Start LazyFS on ``mnt`` and open the held FIFO writer; on failure nothing is left mounted."""
        if self._proc is not None:
            raise LazyFSError(f"{self.mnt} is already mounted by this object")
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        if self.mounted:
            raise LazyFSError(f"{self.mnt} is already a mount point (a run that did not clean up?)")
        with contextlib.suppress(FileNotFoundError):
            self.fifo.unlink()  # a stale FIFO can still hold an old command
        self.config.write_text(config_toml(self.fifo, self.log, self.cache_mb))
        env = {**os.environ, "LD_LIBRARY_PATH": str(self.binary.parent)}  # libpcache sits next to the binary
        with open(self.console, "wb") as console:
            # -f: stay in the foreground, so that this Popen is the daemon and can be reaped.
            self._proc = subprocess.Popen(
                [str(self.binary), str(self.mnt), "--config-path", self.config.name, "-o", "allow_other",
                 "-o", "modules=subdir", "-o", f"subdir={self.root}", "-f"],
                stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT, env=env, cwd=self.base,
                start_new_session=True)
        try:
            self._wait_ready(deadline_s)
        except BaseException:
            self.unmount()
            raise

    def _wait_ready(self, deadline_s: float) -> None:
        assert self._proc is not None
        end = time.monotonic() + deadline_s
        while True:
            if self._proc.poll() is not None:
                raise LazyFSError(f"LazyFS exited with {self._proc.returncode} while mounting {self.mnt}:\n"
                                  f"{self._tail()}")
            if self.mounted and READY_MARK in _read_text(self.log):
                try:
                    self._writer = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
                    return
                except OSError as err:
                    if err.errno not in (errno.ENXIO, errno.ENOENT):
                        raise LazyFSError(f"cannot open {self.fifo}: {err.strerror}") from None
            if time.monotonic() > end:
                raise LazyFSError(f"LazyFS did not mount {self.mnt} within {deadline_s:g}s:\n{self._tail()}")
            time.sleep(POLL_S)

    def clear_cache(self, deadline_s: float = CLEAR_DEADLINE_S) -> None:
        if self._writer is None:
            raise LazyFSError(f"{self.mnt} is not mounted")
        clear_cache(self.fifo, self.log, deadline_s)

    def unsynced_bytes(self, deadline_s: float = CLEAR_DEADLINE_S) -> int:
        if self._writer is None:
            raise LazyFSError(f"{self.mnt} is not mounted")
        return unsynced_bytes(self.fifo, self.log, deadline_s)

    def unmount(self, deadline_s: float = UNMOUNT_DEADLINE_S) -> list[str]:
        """Unmount and reap LazyFS; return what did not go cleanly (empty when all did).  Idempotent.

        Whatever still uses the mount should be stopped first; if something
        does, the unmount is lazy (the mount point is detached now, the file
        system goes when its last user does) and that is reported.
        """
        problems: list[str] = []
        if self._writer is not None:
            os.close(self._writer)
            self._writer = None
        if self.mounted:
            proc = subprocess.run(["fusermount3", "-u", str(self.mnt)], capture_output=True, text=True,
                                  timeout=deadline_s)
            if proc.returncode != 0:
                problems.append(f"fusermount3 -u {self.mnt}: {proc.stderr.strip()}; unmounted lazily")
                lazy = subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True, text=True,
                                      timeout=deadline_s)
                if lazy.returncode != 0:
                    subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True, timeout=deadline_s)
            if self.mounted:
                problems.append(f"{self.mnt} is still mounted")
        if self._proc is not None:
            try:
                self._proc.wait(timeout=deadline_s)
            except subprocess.TimeoutExpired:
                problems.append(f"LazyFS (pid {self._proc.pid}) did not exit after the unmount; killed")
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        return problems

    def __enter__(self) -> LazyFSMount:
        self.mount()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        problems = self.unmount()
        if problems and exc is None:
            raise LazyFSError("; ".join(problems))
