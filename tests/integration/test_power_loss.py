"""Power loss (#18): jepsen-lite's ``power`` nemesis cuts the power of every node or of a majority.

Every node's data is on a LazyFS mount of its own; a cut is kill -9 and then
LazyFS dropping every byte the node had not fsynced.  Nodes that fsync
before they acknowledge lose nothing acknowledged and every checker stays
valid.  The same schedule against nodes started with ``--unsafe-no-fsync``
must lose acknowledged writes, and the checkers must say so: that is what
shows this test can fail.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "jepsen-lite"))

from jepsenlite.lazyfs import LAZYFS_BIN_DEFAULT, mounted_paths, why_lazyfs_unavailable

REASON = why_lazyfs_unavailable(LAZYFS_BIN_DEFAULT)
pytestmark = [pytest.mark.integration, pytest.mark.skipif(REASON is not None, reason=f"LazyFS: {REASON}")]

RUN = Path(__file__).resolve().parents[2] / "jepsen-lite" / "run"
#: After an interrupt, how long a run gets to stop its nodes and unmount.
CLEANUP_S = 60


def jepsen(out: Path, *args: str, timeout_s: float = 240) -> tuple[int, dict[str, Any], str]:
    """Run jepsen-lite; past the timeout, interrupt it (it then stops its nodes and unmounts its disks)."""
    with subprocess.Popen([sys.executable, str(RUN), *args, "--out", str(out)], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True) as proc:
        try:
            _, stderr = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            try:
                proc.communicate(timeout=CLEANUP_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
            raise
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    return proc.returncode, results, stderr


@pytest.fixture(autouse=True)
def _no_disk_outlives_the_test(tmp_path: Path) -> Iterator[None]:
    """Should a run die without unmounting, detach its LazyFS mounts (their daemons then exit)."""
    yield
    for path in mounted_paths(Path("/proc/self/mountinfo").read_text()):
        if path.startswith(str(tmp_path.resolve()) + "/"):
            subprocess.run(["fusermount3", "-u", "-z", path], capture_output=True, timeout=30)


def _power_cuts(results: dict[str, Any]) -> list[dict[str, Any]]:
    cuts = [f for f in results["faults"] if f["kind"] == "power"]
    assert not [f for f in cuts if f.get("error")], cuts
    assert not [n for n in results["notes"] if "internal error" in n or "LazyFS" in n], results["notes"]
    return cuts


def _no_mount_left(out: Path) -> None:
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(out) not in mounts


#: One schedule for both short runs (seed 53, 14 s): cut every node at 2.1 s for 2.6 s, then a majority at 7.4 s
#: for 2.8 s; the cluster serves for a while after each restart, so each cut has acknowledged writes to lose.
SCHEDULE = ("--time-limit", "14", "--target", "local", "--nemesis", "power", "--seed", "53")


def test_power_cuts_lose_nothing_acknowledged(tmp_path: Path) -> None:
    out = tmp_path / "durable"
    code, results, stderr = jepsen(out, *SCHEDULE, "--workload", "register,set,watch")
    assert code == 0, stderr[-3000:]
    assert results["valid"] is True
    assert results["skipped_nemeses"] == {}
    cuts = _power_cuts(results)
    assert [c["target"] for c in cuts] == ["all", "majority"]
    assert len(cuts[0]["nodes"]) == 3 and len(cuts[1]["nodes"]) == 2
    assert results["checkers"]["set"]["counts"]["adds_ok"] > 0
    assert results["checkers"]["watch"]["valid"] is True
    assert all(set(c["unsynced_bytes"]) == set(c["nodes"]) for c in cuts)
    _no_mount_left(out)


def test_power_cuts_catch_nodes_that_never_fsync(tmp_path: Path) -> None:
    out = tmp_path / "unsafe"
    code, results, stderr = jepsen(out, *SCHEDULE, "--workload", "register,set,watch", "--unsafe", "no-fsync")
    assert code == 1, stderr[-3000:]
    assert results["valid"] is False and results["unsafe"] == "no-fsync"
    cuts = _power_cuts(results)
    assert [c["target"] for c in cuts] == ["all", "majority"]
    assert all(dropped > 0 for dropped in cuts[0]["unsynced_bytes"].values()), cuts[0]
    # Everything acknowledged before the first cut was only in LazyFS's cache: gone, and the cluster starts over.
    assert results["checkers"]["set"]["valid"] is False
    assert results["checkers"]["set"]["lost"]["count"] > 0
    assert results["checkers"]["revisions"]["went_backwards"]["count"] > 0
    assert results["checkers"]["watch"]["valid"] is False
    assert "--unsafe no-fsync" in results["replay"]
    _no_mount_left(out)


@pytest.mark.slow
def test_a_minute_of_power_cuts_kills_and_pauses_with_every_workload(tmp_path: Path) -> None:
    out = tmp_path / "long"
    # Seed 4: power all, kill the leader, power a majority, kill, power all, power a majority, kills and pauses.
    code, results, stderr = jepsen(out, "--time-limit", "60", "--target", "local", "--nemesis", "power,kill,pause",
                                   "--workload", "all", "--seed", "4", timeout_s=290)
    assert code == 0, stderr[-3000:]
    assert results["valid"] is True
    assert {c["target"] for c in _power_cuts(results)} == {"all", "majority"}
    _no_mount_left(out)
