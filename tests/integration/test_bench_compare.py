"""The README's benchmark commands, end to end in a tiny mode (numbers are not checked: speed is the machine's
business, not a test's).  Each command is taken from the README, plus options that make it tiny (argparse: the last
value given wins).  The etcd comparisons are slow (and need etcd: installed by the bench itself when we are root,
else skipped); our cluster alone runs in the default suite."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.etcdcluster import ensure_etcd, ensure_etcdctl
from tests.support.readme import REPO, find_command

pytestmark = pytest.mark.integration


def _running_with(marker: str) -> list[int]:
    """PIDs whose command line mentions ``marker`` (a data dir of ours)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker.encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids


def readme_bench(prefix: str, *tiny: str) -> list[str]:
    """The README's command starting with ``prefix``, run by this interpreter, then the ``tiny`` options."""
    argv = shlex.split(find_command(REPO / "README.md", prefix).text)
    assert argv[:2] == ["python", "-m"], argv
    return [sys.executable, *argv[1:], *tiny]


def _compare(out: Path, workloads: str) -> subprocess.CompletedProcess[str]:
    try:
        ensure_etcd()
    except RuntimeError as err:
        pytest.skip(f"etcd is not available and cannot be installed here: {err}")
    cmd = readme_bench("python -m bench.compare --quick", "--duration", "0.5", "--workloads", workloads,
                       "--leases", "20", "--warmup", "0.2", "--drain", "0.5", "--out", str(out))
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"exit {done.returncode}\nstdout: {done.stdout[-3000:]}\nstderr: {done.stderr[-3000:]}"
    return done


def _check(out: Path, done: subprocess.CompletedProcess[str], expected: set[tuple[str, int]]) -> dict[Any, Any]:
    result = json.loads((out / "results.json").read_text())
    durability = result["meta"]["durability"]
    assert set(durability) == {"ours", "etcd_disk", "ours_nofsync", "etcd"}
    assert "fsynced" in durability["ours"]  # the headline pair: durable against durable
    assert "--unsafe-no-fsync" in durability["ours_nofsync"]  # the second: like with like, etcd on tmpfs
    storage = result["meta"]["etcd_storage"]
    assert storage["etcd"] == "tmpfs" and storage["etcd_disk"].startswith("disk"), storage
    rows = {(r["workload"], r.get("concurrency") or r.get("watchers")): r for r in result["workloads"]}
    assert set(rows) == expected
    for key, row in rows.items():
        for system in ("ours", "etcd_disk", "ours_nofsync", "etcd"):
            assert row[system]["ops_per_s"] > 0, (key, system, row)
            assert row[system]["errors"] == 0, (key, system, row)
        assert row["durable"]["ops_ratio"] == pytest.approx(row["ours"]["ops_per_s"] / row["etcd_disk"]["ops_per_s"])
        assert row["unsafe"]["ops_ratio"] == pytest.approx(
            row["ours_nofsync"]["ops_per_s"] / row["etcd"]["ops_per_s"])
        if key[0] == "register":
            # Our durable leader fsyncs its log under writes, and the report says how often.
            assert row["ours"]["fsyncs_per_s"] > 0 and row["ours"]["ops_per_fsync"] > 0, row["ours"]

    report = (out / "results.md").read_text()
    assert "## Durable against durable" in report and "## Without fsync" in report
    assert "| workload | ours ops/s | etcd ops/s | ratio |" in report
    assert "tmpfs" in report and "fsync" in report  # durability said for both
    # matplotlib is in the test extra: the plots are part of what this proves.
    assert (out / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Every cluster it started is gone: the data dirs it announced have no process left.
    roots = re.findall(r"data (/\S+)", done.stderr)
    assert len(roots) == 4, done.stderr
    for root in roots:
        assert _running_with(root) == [], root
        assert not Path(root).exists(), root
    return rows


@pytest.mark.parametrize("acl", [False, True], ids=["plain", "acl"])
def test_run_tiny(tmp_path: Path, acl: bool) -> None:
    """The README's `python -m bench.run --quick` on one small workload: our cluster alone, no external tool.

    With ``--acl`` as well: the configuration docker-compose runs, every request carrying a token.
    """
    out = tmp_path / "run"
    cmd = readme_bench("python -m bench.run --quick", "--workloads", "register:4", "--duration", "0.5",
                       "--out", str(out), *(["--acl"] if acl else []))
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"exit {done.returncode}\nstdout: {done.stdout[-3000:]}\nstderr: {done.stderr[-3000:]}"
    result = json.loads((out / "results.json").read_text())
    assert result["meta"]["pysyncobj"]  # recorded through registry.raft, the only pysyncobj importer
    assert result["meta"]["fsync"] is True  # the nodes' default: durable
    assert result["meta"]["acl"] is acl
    [row] = result["workloads"]
    assert row["workload"] == "register" and row["concurrency"] == 4
    assert row["ops_per_s"] > 0 and row["errors"] == 0, row
    assert "| register | 4 |" in (out / "results.md").read_text()


@pytest.mark.slow
def test_compare_tiny(tmp_path: Path) -> None:
    """The write path and the watch path, on all three clusters (~20 s on an idle 2-core machine)."""
    out = tmp_path / "out"
    done = _compare(out, "register:4,watch:10")
    _check(out, done, {("register", 4), ("watch", 10)})


@pytest.mark.slow
def test_compare_every_workload(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = _compare(out, "register:4,get_linearizable:4,lease_keepalive:4,watch:10")
    _check(out, done, {("register", 4), ("get_linearizable", 4), ("lease_keepalive", 4), ("watch", 10)})


@pytest.mark.slow
def test_scale_tiny(tmp_path: Path) -> None:
    """The README's scale command (`python -m bench.compare --scale`) end to end on a few hundred instances."""
    try:
        # Installed as .ci/run does when we are root; else the failure names the Debian package.
        ensure_etcd()
        ensure_etcdctl()
    except RuntimeError as err:
        pytest.fail(f"the scale benchmark needs etcd and etcdctl: {err}")
    out = tmp_path / "scale"
    cmd = readme_bench("python -m bench.compare --scale", "--instances", "300", "--watchers", "20", "--out", str(out))
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"exit {done.returncode}\nstdout: {done.stdout[-3000:]}\nstderr: {done.stderr[-3000:]}"
    result = json.loads((out / "scale.json").read_text())
    ours, etcd = result["systems"]["ours"], result["systems"]["etcd"]
    for system in (ours, etcd):
        assert system["instances"] == 300 and system["instances_per_s"] > 0
        assert system["snapshot"]["bytes"] > 0 and system["restart_s"] > 0
        assert system["watchers"] == 20
    # The restart brought every write back, on every node.
    assert ours["state_restored"] is True and ours["state_after_restart"] == ours["state_before_restart"]
    assert "| measure |" in (out / "scale.md").read_text()


def test_timeline_tiny(tmp_path: Path) -> None:
    """bench/README.md's `python -m bench.timeline`: a lone write's stages line up across the three nodes."""
    from registry.build import build_kind

    if build_kind() != "pure":
        pytest.skip("bench.timeline wraps classes, which needs the pure-Python build (it says so and exits 1)")
    argv = shlex.split(find_command(REPO / "bench" / "README.md", "python -m bench.timeline").text)
    out = tmp_path / "timeline.json"
    cmd = [sys.executable, *argv[1:], "--writes", "40", "--root", str(tmp_path / "root"), "--json", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"exit {done.returncode}\nstdout: {done.stdout[-3000:]}\nstderr: {done.stderr[-3000:]}"
    result = json.loads(out.read_text())
    # Heartbeats and elections can break a chain now and then; most writes must line up.
    assert result["lined_up"] >= 20, result
    stages = result["stages"]
    names = list(stages)
    assert names[0] == "client sends" and names[-1] == "client receives"
    assert "follower's fdatasync ends" in stages and "leader applied" in stages
    assert all(step >= 0 for _offset, step in stages.values()), stages
    assert stages["client receives"][0] >= stages["leader applied"][0] > 0
    assert "| leader applies |" in done.stdout
    assert _running_with(str(tmp_path / "root")) == []
