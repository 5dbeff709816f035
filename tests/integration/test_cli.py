"""The ``regctl`` command line, run as a subprocess against real node processes."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from registry.server.ports import ports_free
from tests.support.build import installed_build
from tests.support.cluster import Cluster, regctl_executable, wait_until
from tests.support.up import UP_PORT_OFFSETS

pytestmark = pytest.mark.integration

STATUS_KEYS = {"id", "role", "term", "commit_index", "applied_index", "revision", "api", "reachable", "pid"}


def regctl(*args: str, endpoints: list[str] | None = None, timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
    cmd = [regctl_executable()]
    if endpoints is not None:
        cmd += ["--endpoints", ",".join(endpoints)]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout_s, check=False)


def ok_json(*args: str, endpoints: list[str]) -> Any:
    proc = regctl("-o", "json", *args, endpoints=endpoints)
    assert proc.returncode == 0, f"regctl {' '.join(args)} exited {proc.returncode}: {proc.stderr}"
    return json.loads(proc.stdout)


def ok_table(*args: str, endpoints: list[str]) -> str:
    proc = regctl(*args, endpoints=endpoints)
    assert proc.returncode == 0, f"regctl {' '.join(args)} exited {proc.returncode}: {proc.stderr}"
    return proc.stdout


def free_endpoint() -> str:
    """A loopback address nothing listens on (bound and released, never listened)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


# -- status ----------------------------------------------------------------------------------


def test_status_json_and_table(cluster: Cluster) -> None:
    nodes = ok_json("status", endpoints=cluster.endpoints)
    assert isinstance(nodes, list) and len(nodes) == 3
    installed = installed_build()
    for node in nodes:
        assert STATUS_KEYS <= set(node), f"missing keys in {node}"
        assert node["reachable"] is True
        # The nodes run the installed regctl: its build, mypyc or pure (#24).
        assert node["build"] == installed, node
    assert sorted(n["api"] for n in nodes) == sorted(cluster.endpoints)
    assert sorted(n["id"] for n in nodes) == ["n1", "n2", "n3"]
    assert [n["role"] for n in nodes].count("leader") == 1

    text = ok_table("status", endpoints=cluster.endpoints)
    header, *rows = text.strip().splitlines()
    assert header.split() == [k.upper() for k in ("id", "role", "term", "commit_index", "applied_index",
                                                  "revision", "api", "reachable", "pid")]
    assert len(rows) == 3 and sum("leader" in r.split() for r in rows) == 1

    # One follower down: still ready (exit 0), and that node says it is unreachable.  (The leader down
    # is exit 3 until a new one is elected: tests/integration/test_up.py.)
    leader = cluster.wait_leader()
    dead = next(n for n in cluster.nodes if n is not leader)
    cluster.kill(dead)
    nodes = ok_json("status", endpoints=cluster.endpoints)
    by_api = {n["api"]: n for n in nodes}
    assert by_api[dead.api]["reachable"] is False
    assert all(by_api[n.api]["reachable"] for n in cluster.nodes if n is not dead)


# -- service commands ------------------------------------------------------------------------


def test_service_register_get_list_deregister_table_and_json(cluster: Cluster) -> None:
    eps = cluster.endpoints
    out = ok_table("service", "register", "web", "--address", "10.1.0.1:8080", "--meta", "zone=a",
                   "--tag", "blue", "--weight", "5", endpoints=eps)
    assert "registered web/web-10.1.0.1-8080 at revision" in out

    reg = ok_json("service", "register", "web", "--address", "10.1.0.2:8080", "--id", "w2", endpoints=eps)
    assert reg["service"] == "web" and reg["id"] == "w2" and isinstance(reg["revision"], int)

    got = ok_json("service", "get", "web", endpoints=eps)
    assert got["revision"] >= reg["revision"]
    by_id = {i["id"]: i for i in got["instances"]}
    assert set(by_id) == {"web-10.1.0.1-8080", "w2"}
    first = by_id["web-10.1.0.1-8080"]
    assert (first["address"], first["port"], first["weight"]) == ("10.1.0.1", 8080, 5)
    assert first["meta"] == {"zone": "a"} and first["tags"] == ["blue"]

    text = ok_table("service", "get", "web", endpoints=eps)
    header, *rows = text.strip().splitlines()
    assert header.split() == ["ID", "ADDRESS", "PORT", "STATUS", "WEIGHT", "TAGS", "META", "NOTE"]
    assert any(r.split()[:5] == ["web-10.1.0.1-8080", "10.1.0.1", "8080", "passing", "5"] for r in rows)
    assert rows[-1] == f"revision: {got['revision']}"

    stale = ok_json("service", "get", "web", "--consistency", "stale", "--min-revision", str(reg["revision"]),
                    endpoints=[cluster.nodes[2].api])
    assert {i["id"] for i in stale["instances"]} == {"web-10.1.0.1-8080", "w2"}

    ok_table("service", "register", "db", "--address", "10.2.0.1:5432", endpoints=eps)
    listed = ok_json("service", "list", endpoints=eps)
    counts = {s["name"]: s["instances"] for s in listed["services"]}
    assert counts == {"db": 1, "web": 2}
    text = ok_table("service", "list", endpoints=eps)
    lines = text.strip().splitlines()
    assert lines[0].split() == ["NAME", "INSTANCES", "PASSING", "TAGS"]
    assert any(line.split()[:3] == ["web", "2", "2"] for line in lines[1:])

    out = ok_table("service", "deregister", "web", "w2", endpoints=eps)
    assert "deregistered web/w2 at revision" in out
    dereg = ok_json("service", "deregister", "web", "web-10.1.0.1-8080", endpoints=eps)
    assert dereg["service"] == "web" and dereg["revision"] > reg["revision"]
    got = ok_json("service", "get", "web", endpoints=eps)
    assert got["instances"] == []


def test_service_status_check_in_and_bad_input(cluster: Cluster) -> None:
    eps = cluster.endpoints
    ok_json("service", "register", "chk", "--address", "10.3.0.1:80", "--id", "c1", endpoints=eps)
    set_crit = ok_json("service", "status", "chk", "c1", "critical", "--note", "disk full", endpoints=eps)
    assert set_crit["changed"] is True and set_crit["status"] == "critical"
    got = ok_json("service", "get", "chk", endpoints=eps)
    assert got["instances"][0]["status"] == "critical" and got["revision"] >= set_crit["revision"]
    # The note of the status change shows in service get, JSON and table.
    assert got["instances"][0]["note"] == "disk full"
    header, row = ok_table("service", "get", "chk", endpoints=eps).strip().splitlines()[:2]
    assert header.split()[3] == "STATUS" and header.split()[-1] == "NOTE"
    assert row.split()[3] == "critical" and row.endswith("disk full"), row
    listed = {s["name"]: s for s in ok_json("service", "list", endpoints=eps)["services"]}
    assert listed["chk"]["passing"] == 0

    # A repeated check-in is not a change: no new revision.
    again = ok_table("service", "status", "chk", "c1", "critical", endpoints=eps)
    assert f"chk/c1 critical (unchanged) at revision {set_crit['revision']}" in again

    before = ok_json("service", "get", "chk", endpoints=eps)
    for args, code in ((("chk", "c1", "sick"), "INVALID_ARGUMENT"), (("chk", "nope", "passing"), "NOT_FOUND"),
                       (("chk", "c1", "passing", "--note", "x" * 1025), "INVALID_ARGUMENT")):
        proc = regctl("service", "status", *args, endpoints=eps)
        assert proc.returncode == 1 and code in proc.stderr, (args, proc.returncode, proc.stderr)
    assert ok_json("service", "get", "chk", endpoints=eps) == before

    back = ok_json("service", "status", "chk", "c1", "passing", endpoints=eps)
    assert back["changed"] is True and back["revision"] > set_crit["revision"]
    # A change without a note clears the old one.
    assert "note" not in ok_json("service", "get", "chk", endpoints=eps)["instances"][0]


# -- exit codes ------------------------------------------------------------------------------


def test_exit_codes(cluster: Cluster) -> None:
    eps = cluster.endpoints
    # 1: the cluster refused the request.
    for args in (("service", "get", "no-such-service"), ("service", "deregister", "no-such", "i1")):
        proc = regctl(*args, endpoints=eps)
        assert proc.returncode == 1, f"{args}: exit {proc.returncode}, stderr {proc.stderr}"
        assert "NOT_FOUND" in proc.stderr
    proc = regctl("service", "register", "bad name!", "--address", "10.0.0.1:80", endpoints=eps)
    assert proc.returncode == 1 and "INVALID_NAME" in proc.stderr, proc.stderr

    # 3: nothing reachable.
    nowhere = [free_endpoint()]
    proc = regctl("--timeout", "1", "service", "get", "web", endpoints=nowhere)
    assert proc.returncode == 3, f"exit {proc.returncode}, stderr {proc.stderr}"
    assert "UNAVAILABLE" in proc.stderr
    proc = regctl("status", endpoints=nowhere)
    assert proc.returncode == 3, f"exit {proc.returncode}, stderr {proc.stderr}"

    # 2: usage errors, before any request is sent.
    usage: list[tuple[str, ...]] = [
        ("--endpoints", "nope", "status"),
        ("--endpoints", "", "status"),
        ("service", "register", "web"),  # --address missing
        ("service", "register", "web", "--address", "10.0.0.1"),  # no port
        ("service", "register", "web", "--address", "10.0.0.1:80", "--meta", "novalue"),
        ("service", "register", "web", "--address", "10.0.0.1:80", "--weight", "heavy"),
        ("service", "get"),
        ("service", "get", "web", "--consistency", "eventual"),
        ("-o", "yaml", "status"),
        ("no-such-command",),
    ]
    for args in usage:
        proc = regctl("--endpoints", ",".join(eps), *args) if args[0] != "--endpoints" else regctl(*args)
        assert proc.returncode == 2, f"{args}: exit {proc.returncode}, stderr {proc.stderr}"


# -- regctl up -------------------------------------------------------------------------------


def _ports_free(base: int, nodes: int) -> bool:
    return ports_free(base + off + i for i in range(1, nodes + 1) for off in UP_PORT_OFFSETS)


def _free_base_port() -> int:
    for _ in range(100):
        # Below the ephemeral range (32768+), away from the test clusters (20000-32700).
        base = random.randrange(10_000, 19_500, 10)
        if _ports_free(base, 3):
            return base
    raise RuntimeError("no free port range for regctl up")


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out.update(int(c) for c in (task / "children").read_text().split())
        except OSError:
            continue
    return out


def _alive_with(pid: int, marker: str) -> bool:
    """Whether ``pid`` still runs a command line mentioning ``marker`` (guards against pid reuse)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return marker.encode() in cmdline and stat.rsplit(")", 1)[1].split()[0] != "Z"


class Up:
    """One ``regctl up`` process, its node children remembered so cleanup can reach them."""

    def __init__(self, data_dir: Path, base_port: int, log: Path) -> None:
        self.data_dir = data_dir
        self.endpoints = [f"127.0.0.1:{base_port + i}" for i in (1, 2, 3)]
        self.node_pids: set[int] = set()
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [regctl_executable(), "up", "--base-port", str(base_port), "--data-dir", str(data_dir)],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def wait_ready(self) -> None:
        def leader_shown() -> bool:
            assert self.proc.poll() is None, f"regctl up exited with {self.proc.returncode}"
            proc = regctl("-o", "json", "status", endpoints=self.endpoints)
            if proc.returncode != 0:
                return False
            return any(n.get("reachable") and n.get("role") == "leader" for n in json.loads(proc.stdout))

        wait_until(leader_shown, 40, "regctl up to show a leader in `regctl status`", interval_s=0.3)
        self.node_pids |= _children(self.proc.pid)
        assert len(self.node_pids) == 3, f"regctl up runs {len(self.node_pids)} node processes"

    def interrupt(self, deadline_s: float = 15.0) -> int:
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout=deadline_s)

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        # The nodes run in their own sessions: end them by pid, if they are still ours.
        for pid in self.node_pids:
            if _alive_with(pid, str(self.data_dir)):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def up_runs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[list[Up]]:
    runs: list[Up] = []
    try:
        yield runs
    finally:
        for run in runs:
            run.cleanup()
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            for log in sorted(tmp_path.rglob("*.log")):
                print(f"--- {log} ---\n{log.read_text(errors='replace')[-3000:]}")


def test_regctl_up_serves_stops_on_sigint_and_keeps_data(tmp_path: Path, up_runs: list[Up]) -> None:
    base = _free_base_port()
    data_dir = tmp_path / "up-data"

    first = Up(data_dir, base, tmp_path / "up-1.log")
    up_runs.append(first)
    first.wait_ready()
    reg = ok_json("service", "register", "api", "--address", "10.9.0.1:443", "--id", "a1",
                  endpoints=first.endpoints)
    assert (data_dir / "cluster.key").exists()

    stopping = time.monotonic()
    code = first.interrupt()
    assert code == 0, f"regctl up exited {code} on SIGINT ({time.monotonic() - stopping:.1f}s)"
    wait_until(lambda: not any(_alive_with(pid, str(data_dir)) for pid in first.node_pids), 5,
               "the nodes of regctl up to exit with it")
    assert "stopped." in (tmp_path / "up-1.log").read_text()

    wait_until(lambda: _ports_free(base, 3), 10, "the ports of the stopped cluster to be free")
    second = Up(data_dir, base, tmp_path / "up-2.log")
    up_runs.append(second)
    second.wait_ready()
    got = ok_json("service", "get", "api", endpoints=second.endpoints)
    assert [(i["id"], i["address"], i["port"]) for i in got["instances"]] == [("a1", "10.9.0.1", 443)]
    assert got["revision"] >= reg["revision"]
    assert second.interrupt() == 0
