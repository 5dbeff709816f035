"""A throwaway three-node etcd cluster on 127.0.0.1 for the side-by-side benchmark.

Uses the Debian package ``etcd-server`` (installed with apt when missing and we are root).  Every
node gets its own data dir under one temp folder, placed either on tmpfs (``/dev/shm``: etcd's WAL
fsyncs cost nothing, like our never-fsynced journal) or on the disk under the temp dir (etcd's
default durability: an fsync per WAL batch).  Ports: client base+i, peer base+100+i, with the
base picked in ``PORT_RANGE``, apart from the test clusters (10000-32700), Linux's ephemeral range
(32768-60999) and our own benchmark clusters (61000-65200).

The object has the same shape ``run.py`` and ``watch.py`` use on ``BenchCluster`` (``nodes`` with
``node_id``/``api``/``pid``, ``endpoints``, ``leader()``, ``node()``, ``check_alive()``,
``cpu_seconds()``, ``stop()``), so the same orchestration drives both systems.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bench.localcluster import NodeProcess, ProcessCluster
from registry.server.ports import ports_free

__all__ = ["EtcdCluster", "EtcdNode", "ensure_etcd", "ensure_etcdctl", "ensure_tool", "etcd_version"]

PORT_RANGE = (8_100, 9_800)
#: Where the "fast" (fsync-free) data dirs go: tmpfs makes fsync a no-op.
TMPFS = Path("/dev/shm")
DISK_TMP = Path("/var/tmp")


def fs_type(path: Path) -> str:
    """The type of the file system ``path`` is on (the longest mount point above it in /proc/mounts)."""
    best, kind = "", "unknown"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                fields = line.split()
                mount = fields[1]
                if (str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                    best, kind = mount, fields[2]
    except OSError:
        pass
    return kind


def ensure_tool(binary: str, package: str, install: bool = True) -> str:
    """Path of ``binary``; as root, apt-get installs Debian's ``package`` first if it is missing (as .ci/run
    does).  Otherwise RuntimeError, saying which package to install."""
    found = shutil.which(binary)
    if found is not None:
        return found
    if not install:
        raise RuntimeError(f"{binary} is not installed (Debian: apt-get install {package})")
    if os.geteuid() != 0:
        raise RuntimeError(f"{binary} is not installed and we are not root: run `sudo apt-get install -y {package}`")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install_cmd = ["apt-get", "install", "-y", "-qq", package]
    done = subprocess.run(install_cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:  # a fresh image has no package lists yet
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        done = subprocess.run(install_cmd, env=env, capture_output=True, text=True)
    found = shutil.which(binary)
    if found is None:
        raise RuntimeError(f"apt-get install {package} failed: {done.stderr.strip()[-500:]}")
    return found


def ensure_etcd(install: bool = True) -> str:
    """Path of the ``etcd`` binary (an etcd 3.4+ on PATH will do); see ``ensure_tool``."""
    # The package's postinst starts a system etcd on 2379 where systemd runs; ours use other ports.
    return ensure_tool("etcd", "etcd-server", install)


def ensure_etcdctl(install: bool = True) -> str:
    """Path of ``etcdctl`` (the scale benchmark's etcd snapshot): Debian ships it apart, in etcd-client."""
    return ensure_tool("etcdctl", "etcd-client", install)


def etcd_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.startswith("etcd Version:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


@dataclass
class EtcdNode(NodeProcess):
    peer: str


class EtcdCluster(ProcessCluster[EtcdNode]):
    what = "etcd member"

    def __init__(self, durable: bool, size: int = 3, keep_data: bool = False) -> None:
        #: durable: data dirs on disk (etcd's fsyncs are real); else on tmpfs (fsync costs nothing).
        self.durable = durable
        self.binary = ensure_etcd()
        # /var/tmp is disk-backed by convention (/tmp may be tmpfs); the file system is recorded either way.
        parent = (DISK_TMP if DISK_TMP.is_dir() else None) if durable else (TMPFS if TMPFS.is_dir() else None)
        self.root = Path(tempfile.mkdtemp(prefix="etcdbench-", dir=parent))
        self.fs_type = fs_type(self.root)
        self.keep_data = keep_data
        for _ in range(200):
            base = random.randrange(PORT_RANGE[0], PORT_RANGE[1] - 200, 10)
            if ports_free([base + off + i for i in range(1, size + 1) for off in (0, 100)]):
                break
        else:
            raise RuntimeError("no free loopback port range for the etcd cluster")
        self.nodes = [EtcdNode(f"e{i}", f"127.0.0.1:{base + i}", self.root / f"e{i}",
                               peer=f"127.0.0.1:{base + 100 + i}") for i in range(1, size + 1)]

    @property
    def storage(self) -> str:
        """What the data dirs are on, as the report says it: "tmpfs", or "disk (ext4)" etc."""
        return "tmpfs" if self.fs_type == "tmpfs" else f"disk ({self.fs_type})"

    @property
    def endpoints(self) -> list[str]:
        return [n.api for n in self.nodes]

    def command(self, node: EtcdNode, token: str) -> list[str]:
        initial = ",".join(f"{n.node_id}=http://{n.peer}" for n in self.nodes)
        return [
            self.binary, "--name", node.node_id, "--data-dir", str(node.data_dir),
            "--listen-client-urls", f"http://{node.api}", "--advertise-client-urls", f"http://{node.api}",
            "--listen-peer-urls", f"http://{node.peer}", "--initial-advertise-peer-urls", f"http://{node.peer}",
            "--initial-cluster", initial, "--initial-cluster-state", "new", "--initial-cluster-token", token,
            # Room for the scale run's 100k keys with leases; the default 2 GiB quota is plenty otherwise.
            "--quota-backend-bytes", str(8 << 30), "--logger", "zap", "--log-level", "warn",
        ]

    def start(self, ready_timeout_s: float = 30.0) -> str:
        """Start every member; return the leader's node id once it serves linearizable reads."""
        self.launch()
        return self.wait_leader(ready_timeout_s)

    def launch(self) -> None:
        """Start the member processes (``start`` without waiting for a leader)."""
        token = "bench-" + secrets.token_hex(6)
        for node in self.nodes:
            node.data_dir.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path(node), "ab") as log:
                node.proc = subprocess.Popen(self.command(node, token), stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True)

    def restart(self, ready_timeout_s: float = 120.0) -> float:
        """Stop every member (SIGTERM) and start them again on the same data; seconds until serving."""
        self.stop(remove=False)
        began = time.monotonic()
        self.launch()  # members with data read their membership from it and ignore the new cluster token
        self.wait_leader(ready_timeout_s)
        return time.monotonic() - began

    def post(self, endpoint: str, path: str, body: dict[str, object], timeout_s: float = 2.0) -> dict[str, object]:
        """One JSON call to the gateway with the standard library (setup and checks only, not the load)."""
        req = urllib.request.Request(f"http://{endpoint}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            result: dict[str, object] = json.loads(resp.read())
            return result

    def statuses(self) -> list[dict[str, object]]:
        out = []
        for node in self.nodes:
            try:
                st = self.post(node.api, "/v3/maintenance/status", {}, timeout_s=1.0)
                header = st.get("header")
                member = header.get("member_id") if isinstance(header, dict) else None
                out.append({"id": node.node_id, "reachable": True, "is_leader": member == st.get("leader"),
                            "leader": st.get("leader"), "db_size": int(str(st.get("dbSize", 0)))})
            except (OSError, urllib.error.URLError, ValueError):
                out.append({"id": node.node_id, "reachable": False})
        return out

    def leader(self) -> str | None:
        for st in self.statuses():
            if st.get("is_leader"):
                return str(st["id"])
        return None

    def wait_leader(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            leader = self.leader()
            if leader is not None:
                try:
                    # Serving: a linearizable range goes through ReadIndex on the leader.
                    self.post(self.node(leader).api, "/v3/kv/range", {"key": "AA=="}, timeout_s=2.0)
                    return leader
                except (OSError, urllib.error.URLError):
                    pass
            time.sleep(0.2)
        raise RuntimeError(f"etcd: no leader within {timeout_s:g}s; logs in {self.root}")

    def log_path(self, node: EtcdNode) -> Path:
        return self.root / f"{node.node_id}.log"
