"""jepsen-lite end to end: short runs against real clusters must come back valid."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

RUN = Path(__file__).resolve().parents[2] / "jepsen-lite" / "run"


def jepsen(out: Path, *args: str, timeout_s: float = 240) -> tuple[int, dict[str, Any], str]:
    proc = subprocess.run([sys.executable, str(RUN), *args, "--out", str(out)], capture_output=True, text=True,
                          timeout=timeout_s)
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    return proc.returncode, results, proc.stderr


def test_compose_target_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    # The compose target itself runs in tests/compose (slow, root, Docker); here only its refusals.
    code, _, stderr = jepsen(tmp_path / "out", "--time-limit", "5", "--target", "compose", "--nodes", "5",
                             timeout_s=60)
    assert code == 2
    assert "docker-compose.yml's three nodes" in stderr


def test_local_kill_pause_membership_with_watches(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # Seed 23 plans: kill -9 the leader, pause a random node, add a fourth member (and remove it).
    code, results, stderr = jepsen(out, "--time-limit", "15", "--target", "local", "--nemesis",
                                   "kill,pause,membership", "--workload", "register,set,watch", "--seed", "23")
    assert code == 0, stderr[-3000:]
    assert results["valid"] is True
    assert results["seed"] == 23
    assert results["counts"]["ok"] > 0
    assert {f["kind"] for f in results["faults"]} == {"kill", "pause", "membership"}
    watch = results["checkers"]["watch"]
    assert watch["valid"] is True and watch["counts"]["streams"] >= 6 and watch["counts"]["writes_ok"] > 0
    for name in ("history.jsonl", "results.json", "summary.txt", "timeline.svg", "report.html"):
        assert (out / name).exists(), name
    first = json.loads((out / "history.jsonl").read_text().splitlines()[0])
    assert {"process", "type", "f", "key", "value", "time"} <= set(first)
    page = (out / "report.html").read_text()
    assert "valid = True" in page and "--seed 23" in page and page.count("<svg") == 2


def _netns_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("ip") is None:
        return "needs iproute2"
    if shutil.which("iptables") is None:
        return "needs iptables"
    return None


@pytest.mark.skipif(_netns_missing() is not None, reason=f"netns target: {_netns_missing()}")
def test_netns_partitions_and_membership(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # Seed 8 plans: remove a follower (and add it back on an empty data directory), isolate the leader.
    code, results, stderr = jepsen(out, "--time-limit", "15", "--target", "netns", "--nemesis", "partition,membership",
                                   "--workload", "register,set,watch", "--seed", "8")
    assert code == 0, stderr[-3000:]
    assert results["valid"] is True
    assert not results["skipped_nemeses"]
    assert [f["target"] for f in results["faults"]] == ["remove-follower", "isolate-leader"]
    # Teardown removed every namespace this run created.
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    spec = json.loads((out / "session-spec.json").read_text())
    assert not any(ns in listing for ns in spec["topology"]["namespaces"])


@pytest.mark.slow
def test_local_everything_for_a_minute(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, results, stderr = jepsen(out, "--time-limit", "60", "--target", "local", "--nemesis", "all",
                                   "--workload", "all", "--seed", "2", timeout_s=290)
    assert code == 0, stderr[-3000:]
    assert results["valid"] is True
    assert "partition" in results["skipped_nemeses"]


@pytest.mark.skipif(_netns_missing() is not None, reason=f"netns target: {_netns_missing()}")
def test_lease_keepalive_through_a_deposed_leader(tmp_path: Path) -> None:
    code, results, stderr = jepsen(tmp_path / "out", "--target", "netns", "--scenario", "lease-deposed-leader",
                                   "--trials", "6", "--seed", "1")
    assert code == 0, stderr[-3000:]
    assert results["checkers"]["lease"]["valid"] is True


@pytest.mark.skipif(_netns_missing() is not None, reason=f"netns target: {_netns_missing()}")
def test_unsafe_local_reads_are_caught(tmp_path: Path) -> None:
    """The checkers must be able to fail: nodes serving linearizable reads locally answer a stale read
    through a cut-off follower, and the run is invalid (exit 1); correct nodes pass the same scenario."""
    code, results, stderr = jepsen(tmp_path / "unsafe", "--target", "netns", "--scenario", "stale-read",
                                   "--trials", "3", "--seed", "1", "--unsafe", "local-reads")
    assert code == 1, stderr[-3000:]
    assert results["valid"] is False and results["unsafe"] == "local-reads"
    assert results["checkers"]["linearizable-register"]["valid"] is False
    assert "--unsafe local-reads" in results["replay"]
    code, results, stderr = jepsen(tmp_path / "safe", "--target", "netns", "--scenario", "stale-read",
                                   "--trials", "3", "--seed", "1")
    assert code == 0, stderr[-3000:]
    assert results["checkers"]["linearizable-register"]["valid"] is True


@pytest.mark.slow
def test_unsafe_local_reads_fail_a_random_run(tmp_path: Path) -> None:
    """Without a directed scenario: a short random run with pauses against the unsafe nodes is invalid."""
    code, results, stderr = jepsen(tmp_path / "out", "--time-limit", "15", "--target", "local", "--nemesis",
                                   "pause", "--workload", "register", "--seed", "1", "--unsafe", "local-reads")
    assert code == 1, stderr[-3000:]
    assert results["valid"] is False
    assert results["checkers"]["linearizable-register"]["valid"] is False


@pytest.mark.slow
def test_rejoined_empty_node_cannot_elect_a_lagging_leader(tmp_path: Path) -> None:
    """Bug 2 (jepsen-lite/README.md), fixed: the wiped node's vote is refused, so the lagging node never leads."""
    code, results, stderr = jepsen(tmp_path / "out", "--target", "local", "--scenario", "rejoin-empty-voter",
                                   "--trials", "1", "--seed", "1")
    assert code == 0, stderr[-3000:]
    assert results["checkers"]["linearizable-register"]["valid"] is True
    assert any("to lead after" in note for note in results["notes"]), results["notes"]
