"""A throwaway three-node cluster of real ``regctl server`` processes for the benchmark.

Layout as ``regctl up`` (node i: API base+i, Raft base+100+i, HTTP base+200+i)
on 127.0.0.1, with a fresh cluster key and data dir under a temp directory.
Also: CPU time of a process from ``/proc/PID/stat`` (all its threads).
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from registry.client import SyncClient
from registry.errors import RegistryError
from registry.server.ports import ports_free

__all__ = ["BenchCluster", "BenchNode", "LoadTarget", "NodeProcess", "ProcessCluster", "cpu_seconds",
           "machine_busy_seconds", "stop_processes"]

#: Benchmark clusters use base ports in this range (away from regctl up's 7000s and the tests').
# Above Linux's ephemeral range (32768-60999), so no outgoing socket takes a node's port.
PORT_RANGE = (61_000, 65_200)
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (every thread), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    # Fields after the command name, which is in parentheses and may contain spaces.
    rest = data[data.rindex(b")") + 2 :].split()
    utime, stime = int(rest[11]), int(rest[12])
    return (utime + stime) / _CLK_TCK


def stop_processes(procs: Sequence[subprocess.Popen[bytes]], grace_s: float) -> None:
    """SIGTERM each, then SIGKILL whatever is still running after ``grace_s`` (all of them share the grace)."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.05, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent not idle (all CPUs), from /proc/stat."""
    with open("/proc/stat", "rb") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / _CLK_TCK


def regctl_command() -> list[str]:
    """The installed ``regctl`` script next to this interpreter (not a pyenv shim: its PID is the server's)."""
    beside = Path(sys.executable).parent / "regctl"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("regctl")
    if found is None:
        raise RuntimeError("regctl is not installed: run `pip install -e .` in the repository first")
    return [found]


class TargetNode(Protocol):
    @property
    def node_id(self) -> str: ...
    @property
    def api(self) -> str: ...
    @property
    def pid(self) -> int: ...


class LoadTarget(Protocol):
    """What the load orchestration (run.py, watch.py, compare.py) needs of a cluster: ours or etcd's."""

    @property
    def nodes(self) -> Sequence[TargetNode]: ...
    @property
    def endpoints(self) -> list[str]: ...
    @property
    def root(self) -> Path: ...
    def leader(self) -> str | None: ...
    def node(self, node_id: str) -> TargetNode: ...
    def check_alive(self) -> None: ...
    def cpu_seconds(self) -> dict[str, float]: ...


@dataclass
class NodeProcess:
    """One server process of a benchmark cluster: its id, client address, data dir and process."""

    node_id: str
    api: str
    data_dir: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, kw_only=True)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


@dataclass
class BenchNode(NodeProcess):
    raft: str
    http: str


class ProcessNode(Protocol):
    node_id: str
    proc: subprocess.Popen[bytes] | None

    @property
    def pid(self) -> int: ...


NodeT = TypeVar("NodeT", bound=ProcessNode)


class ProcessCluster(Generic[NodeT]):
    """What our benchmark cluster and etcd's share: node processes, their CPU time, liveness, stopping."""

    #: How the logs name one node process.
    what = "node"
    nodes: list[NodeT]
    root: Path
    keep_data: bool

    def log_path(self, node: NodeT) -> Path:
        raise NotImplementedError

    def node(self, node_id: str) -> NodeT:
        return next(n for n in self.nodes if n.node_id == node_id)

    def check_alive(self) -> None:
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is not None:
                # The data dir (and the log) is removed on stop: quote the log's end here.
                try:
                    tail = self.log_path(node).read_text(errors="replace").splitlines()[-15:]
                except OSError:
                    tail = []
                raise RuntimeError(f"{self.what} {node.node_id} exited with code {node.proc.returncode}; "
                                   "end of its log:\n  " + "\n  ".join(tail))

    def cpu_seconds(self) -> dict[str, float]:
        return {n.node_id: cpu_seconds(n.pid) for n in self.nodes}

    def stop(self, grace_s: float = 5.0, remove: bool = True) -> None:
        """Stop every process (SIGTERM, then SIGKILL after ``grace_s``); remove the data unless kept."""
        stop_processes([n.proc for n in self.nodes if n.proc is not None], grace_s)
        for node in self.nodes:
            node.proc = None
        if remove and not self.keep_data:
            shutil.rmtree(self.root, ignore_errors=True)


class BenchCluster(ProcessCluster[BenchNode]):
    def __init__(self, size: int = 3, root: Path | None = None, keep_data: bool = False,
                 env: dict[str, str] | None = None, extra_args: tuple[str, ...] = ()) -> None:
        self.root = root if root is not None else Path(tempfile.mkdtemp(prefix="regbench-"))
        self.keep_data = keep_data
        #: Extra environment and ``regctl server`` arguments for every node (experiments).
        self.env = {**os.environ, **(env or {})}
        self.extra_args = extra_args
        #: With ``--acl`` among the arguments: the management token, once bootstrapped (``bootstrap_acl``).
        self.acl = "--acl" in extra_args
        self.token: str | None = None
        for _ in range(200):
            base = random.randrange(PORT_RANGE[0], PORT_RANGE[1] - 300, 10)
            if ports_free([base + off + i for i in range(1, size + 1) for off in (0, 100, 200)]):
                break
        else:
            raise RuntimeError("no free loopback port range for the benchmark cluster")
        self.base = base
        self.nodes = [
            BenchNode(f"n{i}", f"127.0.0.1:{base + i}", self.root / f"n{i}", raft=f"127.0.0.1:{base + 100 + i}",
                      http=f"127.0.0.1:{base + 200 + i}")
            for i in range(1, size + 1)
        ]
        self.key_file = self.root / "cluster.key"

    @property
    def endpoints(self) -> list[str]:
        return [n.api for n in self.nodes]

    def command(self, node: BenchNode) -> list[str]:
        cmd = [*regctl_command(), "server", "--id", node.node_id, "--data-dir", str(node.data_dir),
               "--raft", node.raft, "--peers", ",".join(n.raft for n in self.nodes if n is not node),
               "--api", node.api, "--http", node.http, "--cluster-key-file", str(self.key_file),
               "--log-level", "WARNING", *self.extra_args]
        for n in self.nodes:
            if n is not node:
                cmd += ["--peer-api", f"{n.raft}={n.api}"]
        return cmd

    def start(self, ready_timeout_s: float = 30.0) -> str:
        """Start every node with a fresh cluster key; return the leader's node id once one is elected and serving."""
        self.write_key()
        self.launch()
        return self.wait_leader(ready_timeout_s)

    def write_key(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")

    def launch(self) -> None:
        """Start the node processes (``start`` without waiting for a leader; writes the cluster key first)."""
        if not self.key_file.exists():
            self.write_key()
        for node in self.nodes:
            node.data_dir.mkdir(parents=True, exist_ok=True)
            with open(node.data_dir / "node.log", "ab") as log:
                # Own session: a Ctrl-C in the terminal reaches only us, and we stop the nodes.
                node.proc = subprocess.Popen(self.command(node), stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True, env=self.env)

    def restart(self, ready_timeout_s: float = 120.0) -> float:
        """Stop every node (SIGTERM) and start them again on the same data and key; seconds until serving."""
        self.stop(remove=False)
        began = time.monotonic()
        self.launch()
        self.wait_leader(ready_timeout_s)
        return time.monotonic() - began

    def bootstrap_acl(self, timeout_s: float = 30.0) -> str:
        """Issue the management token of an ``--acl`` cluster (retried until a leader takes it)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with SyncClient(self.endpoints, timeout_s=5.0, connect_timeout_s=0.3) as client:
                    self.token = str(client.acl_bootstrap()[1]["secret"])
                    return self.token
            except RegistryError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def wal_counts(self) -> dict[str, tuple[float, float]]:
        """Per node: (fdatasyncs of its Raft log, log records they made durable) so far, from its /metrics."""
        counts: dict[str, tuple[float, float]] = {}
        for node in self.nodes:
            try:
                with urllib.request.urlopen(f"http://{node.http}/metrics", timeout=2.0) as resp:
                    text = resp.read().decode()
            except OSError:
                continue
            values = dict.fromkeys(("regctl_wal_fsync_duration_seconds_count", "regctl_wal_fsync_records_sum"), 0.0)
            for line in text.splitlines():
                name, _, value = line.partition(" ")
                if name in values:
                    values[name] = float(value)
            counts[node.node_id] = (values["regctl_wal_fsync_duration_seconds_count"],
                                    values["regctl_wal_fsync_records_sum"])
        return counts

    def statuses(self) -> list[dict[str, object]]:
        with SyncClient(self.endpoints, timeout_s=1.0, connect_timeout_s=0.3, token=self.token) as client:
            statuses: list[dict[str, object]] = client.cluster_status()
            return statuses

    def leader(self) -> str | None:
        for status in self.statuses():
            if status.get("reachable") and status.get("role") == "leader":
                return str(status.get("id"))
        return None

    def wait_leader(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                statuses = self.statuses()
                leaders = [s for s in statuses if s.get("reachable") and s.get("role") == "leader"]
                if len(leaders) == 1 and all(s.get("reachable") and s.get("leader") for s in statuses):
                    if self.acl and self.token is None:
                        # Not bootstrapped yet: the bootstrap itself commits through the leader.
                        self.bootstrap_acl(max(1.0, deadline - time.monotonic()))
                    # Serving: a linearizable read commits a barrier through the leader.
                    with SyncClient(self.endpoints, timeout_s=2.0, connect_timeout_s=0.3, token=self.token) as client:
                        client.call("service_list", {})
                    return str(leaders[0]["id"])
            except RegistryError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"no leader within {timeout_s:g}s; node logs in {self.root}")

    def log_path(self, node: BenchNode) -> Path:
        return node.data_dir / "node.log"
