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


def test_compose_target_is_refused_clearly(tmp_path: Path) -> None:
    code, _, stderr = jepsen(tmp_path / "out", "--time-limit", "5", "--target", "compose", timeout_s=60)
    assert code == 2
    assert "not available yet" in stderr and "docker-compose" in stderr


def test_local_kill_and_pause(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, results, stderr = jepsen(out, "--time-limit", "15", "--target", "local", "--nemesis", "kill,pause",
                                   "--workload", "register,set", "--seed", "1")
    assert code == 0, stderr[-3000:]
    assert results["valid"] is True
    assert results["seed"] == 1
    assert results["counts"]["ok"] > 0
    assert results["nemesis_schedule"], "a 15 s run plans at least one fault"
    for name in ("history.jsonl", "results.json", "summary.txt", "timeline.svg"):
        assert (out / name).exists(), name
    first = json.loads((out / "history.jsonl").read_text().splitlines()[0])
    assert {"process", "type", "f", "key", "value", "time"} <= set(first)


def _netns_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("ip") is None:
        return "needs iproute2"
    if shutil.which("iptables") is None:
        return "needs iptables"
    return None


@pytest.mark.skipif(_netns_missing() is not None, reason=f"netns target: {_netns_missing()}")
def test_netns_partitions(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, results, stderr = jepsen(out, "--time-limit", "15", "--target", "netns", "--nemesis", "partition",
                                   "--workload", "register,set", "--seed", "3")
    assert code == 0, stderr[-3000:]
    assert results["valid"] is True
    assert not results["skipped_nemeses"]
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
