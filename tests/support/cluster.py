"""Real node processes for integration tests: start, kill, pause, restart.

Every node is a ``regctl server`` process of the *installed* package, on
loopback ports chosen per cluster.  ``Cluster.close()`` kills whatever is
left, and the fixture calls it even when the test fails.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from registry.client import SyncClient
from registry.errors import RegistryError
from registry.server.ports import ports_free

T = TypeVar("T")

#: Test clusters use ports in this range, away from regctl up's 7000s and below Linux's default
#: ephemeral range (32768-60999): a port chosen there can be taken by any outgoing connection between
#: the check that it is free and the node's bind, and the node then dies with EADDRINUSE.
PORT_RANGE = (20_000, 32_700)


def wait_until(
    cond: Callable[[], T], deadline_s: float, what: str = "condition", interval_s: float = 0.05
) -> T:
    """Poll ``cond`` until it returns a truthy value or the deadline passes (then fail with ``what``)."""
    end = time.monotonic() + deadline_s
    last_err: BaseException | None = None
    while True:
        try:
            value = cond()
            if value:
                return value
        except (RegistryError, OSError, AssertionError) as err:
            last_err = err
        if time.monotonic() >= end:
            raise AssertionError(
                f"timed out after {deadline_s}s waiting for {what}; last error: {last_err!r}"
            )
        time.sleep(interval_s)


def regctl_executable() -> str:
    path = shutil.which("regctl")
    if path is None:
        raise RuntimeError("regctl is not installed: run `pip install '.[test]'` first")
    return path


@dataclass
class NodeProc:
    node_id: str
    api: str
    raft: str
    http: str
    data_dir: Path
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(default_factory=Path)
    #: DNS HOST:PORT (base+400+i), served only by clusters made with ``dns=True``.
    dns: str = ""


class Cluster:
    def __init__(self, root: Path, size: int = 3, *, key: str | None = "test-cluster-key-0123456789",
                 extra_args: tuple[str, ...] = (), dns: bool = False) -> None:
        self.root = root
        self.key = key
        self.extra_args = extra_args
        self.dns = dns
        offsets = (0, 100, 200, 400) if dns else (0, 100, 200)
        for _ in range(100):
            base = random.randrange(PORT_RANGE[0], PORT_RANGE[1] - 500, 10)
            ports = [base + off + i for i in range(1, size + 1) for off in offsets]
            if ports_free(ports):
                break
        else:
            raise RuntimeError("no free port range for a test cluster")
        self.base = base
        self.nodes = [
            NodeProc(f"n{i}", f"127.0.0.1:{base + i}", f"127.0.0.1:{base + 100 + i}",
                     f"127.0.0.1:{base + 200 + i}", root / f"n{i}", dns=f"127.0.0.1:{base + 400 + i}")
            for i in range(1, size + 1)
        ]
        #: Nodes taken out of the cluster at run time (``retire``): still killed by ``close``.
        self.retired: list[NodeProc] = []
        self.key_file = root / "cluster.key"
        if key is not None:
            root.mkdir(parents=True, exist_ok=True)
            self.key_file.write_text(key)
        self._clients: list[SyncClient] = []

    @property
    def endpoints(self) -> list[str]:
        return [n.api for n in self.nodes]

    def node(self, node_id: str) -> NodeProc:
        return next(n for n in self.nodes if n.node_id == node_id)

    def command(self, node: NodeProc) -> list[str]:
        cmd = [regctl_executable(), "server", "--id", node.node_id, "--data-dir", str(node.data_dir),
               "--raft", node.raft, "--peers", ",".join(n.raft for n in self.nodes if n is not node),
               "--api", node.api, "--http", node.http, *self.extra_args]
        if self.dns:
            cmd += ["--dns", node.dns]
        for n in self.nodes:
            if n is not node:
                cmd += ["--peer-api", f"{n.raft}={n.api}"]
        if self.key is not None:
            cmd += ["--cluster-key-file", str(self.key_file)]
        else:
            cmd += ["--dev"]
        return cmd

    def start_node(self, node: NodeProc) -> None:
        node.data_dir.mkdir(parents=True, exist_ok=True)
        node.log_path = node.data_dir / "node.log"
        with open(node.log_path, "ab") as log:
            node.proc = subprocess.Popen(self.command(node), stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def start_extra_node(self, wait: bool = True) -> NodeProc:
        """Create and start one more node whose ``--peers`` are the current members (``nodes``).

        The node is appended to ``nodes`` (its id and ports follow the numbering of the others), so
        ``command`` gives it the current members as peers; it is *not* a member yet: the caller adds it
        with ``member add RAFT --api API`` on the cluster.  Existing nodes keep running unchanged.
        With ``wait``, returns once the new process answers ``status`` on its API port.
        """
        index = 1 + max(int(n.node_id[1:]) for n in (*self.nodes, *self.retired))
        if index > 9:
            raise RuntimeError("a test cluster has room for nine nodes (ports base+1..base+9)")
        ports = [self.base + off + index for off in (0, 100, 200, 400)]
        if not ports_free(ports if self.dns else ports[:3]):
            raise RuntimeError(f"ports {ports} for node n{index} are in use")
        node = NodeProc(f"n{index}", f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}",
                        f"127.0.0.1:{ports[2]}", self.root / f"n{index}", dns=f"127.0.0.1:{ports[3]}")
        self.nodes.append(node)
        self.start_node(node)
        if wait:
            wait_until(lambda: self.status(node), 20.0, f"{node.node_id} to answer status")
        return node

    def retire(self, node: NodeProc) -> None:
        """Kill a node removed from the cluster and stop counting it as a member (``leader`` majorities)."""
        self.kill(node)
        self.nodes.remove(node)
        self.retired.append(node)

    def start(self, wait: bool = True) -> Cluster:
        for node in self.nodes:
            self.start_node(node)
        if wait:
            self.wait_leader()
        return self

    def wait_identities_recorded(self, deadline_s: float = 15.0) -> None:
        """Until every node says the cluster recorded its data-directory identity (``incarnation_recorded``)."""
        def recorded() -> bool:
            try:
                return all(self.status(n).get("incarnation_recorded") for n in self.nodes)
            except (RegistryError, OSError):
                return False

        wait_until(recorded, deadline_s, "every member's identity recorded")

    def client(self, endpoints: list[str] | None = None, **kwargs: Any) -> SyncClient:
        kwargs.setdefault("timeout_s", 10.0)
        kwargs.setdefault("connect_timeout_s", 0.5)
        client = SyncClient(endpoints or self.endpoints, **kwargs)
        self._clients.append(client)
        return client

    def status(self, node: NodeProc) -> dict[str, Any]:
        with SyncClient([node.api], timeout_s=1.0, connect_timeout_s=0.3) as c:
            return c.node_status(node.api)

    def leader(self) -> NodeProc | None:
        """The node that says it leads and that a majority agrees on, or None."""
        votes: dict[str, int] = {}
        leaders = []
        for node in self.nodes:
            if node.proc is None or node.proc.poll() is not None:
                continue
            try:
                st = self.status(node)
            except (RegistryError, OSError):
                continue
            if st.get("leader"):
                votes[st["leader"]] = votes.get(st["leader"], 0) + 1
            if st.get("role") == "leader":
                leaders.append(node)
        for node in leaders:
            if votes.get(node.raft, 0) > len(self.nodes) // 2:
                return node
        return None

    def wait_leader(self, deadline_s: float = 30.0) -> NodeProc:
        leader = wait_until(self.leader, deadline_s, "a leader")
        assert leader is not None  # wait_until returns only a truthy value
        return leader

    def kill(self, node: NodeProc) -> None:
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(signal.SIGCONT)
            node.proc.kill()
            node.proc.wait()

    def pause(self, node: NodeProc) -> None:
        assert node.proc is not None
        node.proc.send_signal(signal.SIGSTOP)

    def resume(self, node: NodeProc) -> None:
        assert node.proc is not None
        node.proc.send_signal(signal.SIGCONT)

    def stop(self, node: NodeProc) -> int:
        assert node.proc is not None
        node.proc.send_signal(signal.SIGCONT)
        node.proc.terminate()
        return node.proc.wait(timeout=15)

    def close(self) -> None:
        for client in self._clients:
            try:
                client.close()
            except Exception:
                pass
        for node in [*self.nodes, *self.retired]:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.send_signal(signal.SIGCONT)
                node.proc.kill()
                node.proc.wait()

    def logs(self) -> str:
        out = []
        for node in [*self.nodes, *self.retired]:
            if node.log_path.exists():
                out.append(f"--- {node.node_id} ---\n" + node.log_path.read_text(errors="replace")[-4000:])
        return "\n".join(out)


def acl_bootstrap(cluster: Cluster) -> str:
    """``regctl acl bootstrap`` against ``cluster``: the management token's secret."""
    proc = subprocess.run([regctl_executable(), "--endpoints", ",".join(cluster.endpoints), "-o", "json", "acl",
                           "bootstrap"], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    secret: str = json.loads(proc.stdout)["secret"]
    return secret


def closed_by_peer(sock: socket.socket, deadline_s: float) -> bool:
    """True once the other end closed ``sock`` (EOF or reset) within ``deadline_s``; data it sends is ignored."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        sock.settimeout(max(0.01, end - time.monotonic()))
        try:
            if sock.recv(65536) == b"":
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
    return False


def metric(node: NodeProc, sample: str, default: float | None = None) -> float:
    """One sample of ``node``'s /metrics by its full name, labels included (``name{a="b"}``).

    Absent: ``default``, or a failed assertion without one.
    """
    with urllib.request.urlopen(f"http://{node.http}/metrics", timeout=5) as response:
        text = response.read().decode()
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    if match is None:
        assert default is not None, f"{sample} not in /metrics"
        return default
    return float(match.group(1))


def refusals(node: NodeProc, family: str, reason: str) -> float:
    """``<family>_total{reason="..."}`` on ``node``'s /metrics: what a port's guards refused (0 before any)."""
    return metric(node, f'{family}_total{{reason="{reason}"}}', default=0.0)


def socket_from(addr: str, source: str = "127.0.0.2") -> socket.socket:
    """A TCP connection to ``addr`` from another loopback address (Linux routes all of 127/8 to lo), so an
    attack's connections count as a source of their own, apart from the test's clients on 127.0.0.1."""
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(5.0)
    host, _, port = addr.rpartition(":")
    sock.connect((host, int(port)))
    return sock
