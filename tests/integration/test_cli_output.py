"""What the CLI shows: tags, watch order, lease countdowns, a waiting contender.

Real node processes (the ``cluster`` fixture) and ``regctl`` as a subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster import Cluster, regctl_executable, wait_until

pytestmark = pytest.mark.integration


def regctl(*args: str, endpoints: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([regctl_executable(), "--endpoints", ",".join(endpoints), *args],
                          capture_output=True, text=True, timeout=60, check=False)


def ok(*args: str, endpoints: list[str]) -> str:
    proc = regctl(*args, endpoints=endpoints)
    assert proc.returncode == 0, f"regctl {' '.join(args)} exited {proc.returncode}: {proc.stderr}"
    return proc.stdout


class Background:
    """regctl processes left running by a test, with their output (stdout and stderr merged) in files."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self, *args: str, endpoints: list[str]) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.root / f"bg-{len(self.procs)}.log"
        with open(log, "wb") as out:
            # Unbuffered, merged: the file shows lines in the order the process wrote them.
            proc = subprocess.Popen([regctl_executable(), "--endpoints", ",".join(endpoints), *args], stdout=out,
                                    stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.procs.append((proc, log))
        return proc, log

    def close(self) -> None:
        for proc, _ in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture
def background(tmp_path: Path) -> Iterator[Background]:
    bg = Background(tmp_path)
    try:
        yield bg
    finally:
        bg.close()


def test_service_list_tags_are_the_instances_tags(cluster: Cluster) -> None:
    eps = cluster.endpoints
    ok("service", "register", "web", "--address", "10.0.0.1:80", "--tag", "blue", "--tag", "canary", endpoints=eps)
    ok("service", "register", "web", "--address", "10.0.0.2:80", "--tag", "blue", endpoints=eps)
    ok("service", "register", "db", "--address", "10.0.0.3:5432", endpoints=eps)
    header, *rows = ok("service", "list", endpoints=eps).strip().splitlines()
    assert header.split() == ["NAME", "INSTANCES", "PASSING", "TAGS"]
    by_name = {r.split()[0]: r.split() for r in rows if not r.startswith("revision:")}
    assert by_name["web"] == ["web", "2", "2", "blue,canary"]
    assert by_name["db"] == ["db", "1", "1"]
    listed = json.loads(ok("-o", "json", "service", "list", endpoints=eps))
    assert {s["name"]: s["instance_tags"] for s in listed["services"]} == {"web": ["blue", "canary"], "db": []}


def test_watch_list_prints_the_snapshot_before_watching_from(cluster: Cluster, background: Background) -> None:
    eps = cluster.endpoints
    for i in range(3):
        ok("service", "register", "web", "--address", f"10.0.0.{i + 1}:80", endpoints=eps)
    _, log = background.start("watch", "web", "--list", endpoints=eps)
    wait_until(lambda: "watching from" in log.read_text(), 20, "the watch to start")
    ok("service", "status", "web", "web-10.0.0.1-80", "critical", "--note", "disk full", endpoints=eps)
    wait_until(lambda: "note: disk full" in log.read_text(), 20, "the status event")
    lines = log.read_text().splitlines()
    snapshot = next(i for i, line in enumerate(lines) if line.startswith("-- snapshot at revision"))
    watching = next(i for i, line in enumerate(lines) if line.startswith("-- watching from revision"))
    assert snapshot < watching, lines
    snap_rev = int(lines[snapshot].split()[4])
    assert lines[watching] == f"-- watching from revision {snap_rev + 1}"
    # The status change, with its note, after both.
    change = next(i for i, line in enumerate(lines) if "note: disk full" in line)
    assert change > watching and "critical" in lines[change]


def test_lease_list_shows_the_remaining_time(cluster: Cluster) -> None:
    eps = cluster.endpoints
    granted = json.loads(ok("-o", "json", "lease", "grant", "1h", endpoints=eps))
    listed = json.loads(ok("-o", "json", "lease", "list", endpoints=eps))
    item = next(i for i in listed["leases"] if i["lease"] == granted["lease"])
    assert 0 < item["remaining_ms"] <= 3_600_000
    header, *rows = ok("lease", "list", endpoints=eps).strip().splitlines()
    assert header.split() == ["LEASE", "TTL_S", "REMAINING_S", "INSTANCES", "KEYS", "LOCKS"]
    row = next(r.split() for r in rows if r.split()[0] == str(granted["lease"]))
    assert row[1] == "3600.0" and 0 < float(row[2]) <= 3600.0


@pytest.mark.parametrize("command", ["lock", "elect"])
def test_a_waiting_contender_says_whom_it_waits_for(cluster: Cluster, background: Background,
                                                     command: str) -> None:
    eps = cluster.endpoints
    first_args: tuple[str, ...]
    second_args: tuple[str, ...]
    if command == "lock":
        first_args, second_args = ("lock", "shared", "--", "sleep", "60"), ("lock", "shared", "--", "true")
        holder, lock_name = "sleep 60", "shared"
    else:
        first_args, second_args = ("elect", "boss", "--value", "host-a"), ("elect", "boss", "--value", "host-b")
        holder, lock_name = "host-a", "election/boss"
    client = cluster.client()
    first, _ = background.start(*first_args, endpoints=eps)
    record: dict[str, Any] = wait_until(lambda: client.call("lock_get", {"name": lock_name})[1], 20,
                                        "the first contender to hold it")
    second, second_log = background.start(*second_args, endpoints=eps)
    wait_until(lambda: "waiting for" in second_log.read_text(), 20, "the second contender to say it waits")
    line = next(x for x in second_log.read_text().splitlines() if x.startswith("waiting for"))
    assert line == f"waiting for {holder} (since revision {record['create_revision']})…", line
    # The first lets go; the second gets it.
    first.send_signal(signal.SIGINT)
    first.wait(timeout=20)
    if command == "lock":
        assert second.wait(timeout=30) == 0, second_log.read_text()
    else:
        wait_until(lambda: "elected leader of boss" in second_log.read_text(), 30, "the second to be elected")
