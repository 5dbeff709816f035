"""The ``compose`` target: the repository's docker-compose.yml cluster, with Docker's own faults.

``ComposeProject`` brings up a uniquely named project of ``docker-compose.yml``
(three nodes, ports published on 127.0.0.1 from a free block) and takes it
down with its volumes afterwards.  An override file, generated next to the
output, changes two things for the run only: ACLs off (the workload clients
carry no token) and no restart policy (a killed container must stay down
until the nemesis starts it).  The image must exist or be buildable (the
``BASE_IMAGE``/``WHEELS`` build args are passed through from the environment,
see the README).

``ComposeCluster`` maps the nemesis onto containers:

* kill: ``docker kill`` (SIGKILL to the node, PID 1 of its container); start:
  ``docker start``, with the same data volume;
* pause: ``docker pause`` (the cgroup freezer), resume: ``docker unpause``;
* partitions: a node cut off from every other node is disconnected from the
  compose network (``docker network disconnect``; clients lose it too, since
  its published ports go through that network).  Other shapes (bridge,
  one-way SYN drops) are iptables rules inside the receiving container's
  network namespace (``nsenter``), as on the netns target.  Heal reconnects
  with the node's hostname as alias and flushes the rules.

Clock and membership faults are not available here (no libfaketime in the
image, no spare service in the compose file): main.py skips them and says so.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import shutil
import subprocess
from pathlib import Path

from registry.server.ports import ports_free

from .runner import LOCAL_PORT_RANGE, Cluster, NodeSpec, Topology

__all__ = ["ComposeProject", "ComposeCluster", "make_cluster", "COMPOSE_FILE"]

COMPOSE_FILE = Path(__file__).resolve().parents[2] / "docker-compose.yml"
#: The services of docker-compose.yml and the ports inside each container.
NODE_IDS = ("node1", "node2", "node3")
API_PORT, RAFT_PORT, HTTP_PORT = 7001, 7101, 7201
DEFAULT_IMAGE = "raft-registry:local"
#: docker commands are quick, but a loaded machine can stall them for seconds.
DOCKER_TIMEOUT_S = 60.0


def _docker(*args: str, check: bool = True, timeout_s: float = DOCKER_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout_s)
    if check and proc.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[:300]}")
    return proc


def check_usable() -> str | None:
    """Why the compose target cannot run here, or None."""
    if os.geteuid() != 0:
        return "the compose target needs root (Docker, and nsenter for partitions)"
    for tool in ("docker", "docker-compose", "nsenter", "iptables"):
        if shutil.which(tool) is None:
            return f"the compose target needs {tool} (apt-get install docker.io docker-compose iptables)"
    if _docker("info", "--format", "{{.ServerVersion}}", check=False, timeout_s=30).returncode != 0:
        return "the Docker daemon does not answer (start dockerd)"
    return None


class ComposeProject:
    """One docker-compose project for one run: ``setup`` returns its topology, ``teardown`` removes it all."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.name = f"jepsenlite{os.getpid()}x{secrets.token_hex(2)}"
        self.override = root / "compose-override.json"
        self.image = os.environ.get("REGCTL_IMAGE", DEFAULT_IMAGE)
        self.env: dict[str, str] = {}
        self.up = False

    def compose(self, *args: str, timeout_s: float = 600.0) -> subprocess.CompletedProcess[str]:
        cmd = ["docker-compose", "-f", str(COMPOSE_FILE), "-f", str(self.override), "-p", self.name, *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=self.env,
                              cwd=COMPOSE_FILE.parent)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[3:])} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
        return proc

    def _ports(self) -> list[int]:
        picker = random.Random()
        for _ in range(200):
            base = picker.randrange(LOCAL_PORT_RANGE[0], LOCAL_PORT_RANGE[1] - 20, 10)
            ports = [base + i for i in range(2 * len(NODE_IDS))]
            if ports_free(ports):
                return ports
        raise RuntimeError("no free block of loopback ports for the compose project")

    def _write_override(self) -> None:
        services = {}
        for node in NODE_IDS:
            others = [n for n in NODE_IDS if n != node]
            command = ["server", "--id", node, "--data-dir", "/data", "--raft", f"{node}:{RAFT_PORT}",
                       "--peers", ",".join(f"{n}:{RAFT_PORT}" for n in NODE_IDS),
                       "--api", f"0.0.0.0:{API_PORT}", "--http", f"0.0.0.0:{HTTP_PORT}"]
            for other in others:
                command += ["--peer-api", f"{other}:{RAFT_PORT}={other}:{API_PORT}"]
            services[node] = {"command": command, "restart": "no"}
        # JSON is YAML: compose reads it as an override file.
        self.override.write_text(json.dumps({"services": services}, indent=2) + "\n")

    def setup(self) -> Topology:
        self.root.mkdir(parents=True, exist_ok=True)
        key_file = self.root / "cluster.key"
        key_file.write_text(secrets.token_hex(16))
        key_file.chmod(0o600)
        ports = self._ports()
        self.env = {**os.environ, "REGCTL_CLUSTER_KEY": key_file.read_text(), "REGCTL_IMAGE": self.image,
                    "REGCTL_BIND": "127.0.0.1"}
        nodes = []
        for i, node in enumerate(NODE_IDS, start=1):
            api, http = ports[i - 1], ports[len(NODE_IDS) + i - 1]
            self.env[f"REGCTL_API_PORT{i}"] = str(api)
            self.env[f"REGCTL_HTTP_PORT{i}"] = str(http)
            data = self.root / node
            data.mkdir(exist_ok=True)
            # data_dir holds only what jepsen-lite writes (container logs); the node's data is in its volume.
            nodes.append(NodeSpec(node, f"127.0.0.1:{api}", f"{node}:{RAFT_PORT}", f"127.0.0.1:{http}", str(data),
                                  None, ""))
        self._write_override()
        if _docker("image", "inspect", self.image, check=False).returncode != 0:
            self.compose("build", "node1", timeout_s=1800)
        self.up = True
        # Created, not started: the session starts the nodes (ComposeCluster.start_all).
        self.compose("up", "--no-start")
        return Topology("compose", tuple(nodes), str(key_file), compose_project=self.name)

    def teardown(self) -> None:
        if not self.up:
            return
        try:
            self.compose("down", "-v", "--remove-orphans", "--timeout", "5", timeout_s=300)
        finally:
            self.up = False


class ComposeCluster(Cluster):
    """The containers of a compose project, with the nemesis mapped onto Docker (see the module doc)."""

    def __init__(self, topology: Topology, *, faketime_lib: str | None = None) -> None:
        super().__init__(topology, faketime_lib=None)
        assert topology.compose_project, "a compose topology names its project"
        self.project = topology.compose_project
        self.network = f"{self.project}_raft"
        self._cids: dict[str, str] = {}
        #: What we did to each container; nothing else starts or stops them (no restart policy).
        self._up: dict[str, bool] = {}
        self._disconnected: set[str] = set()
        self._drops: set[tuple[str, str]] = set()

    def _cid(self, node_id: str) -> str:
        if node_id not in self._cids:
            out = _docker("ps", "-a", "-q", "--filter", f"label=com.docker.compose.project={self.project}",
                          "--filter", f"label=com.docker.compose.service={node_id}").stdout.split()
            if len(out) != 1:
                raise RuntimeError(f"expected one container for {node_id} in {self.project}, found {out}")
            self._cids[node_id] = out[0]
        return self._cids[node_id]

    def start(self, node_id: str, *, clock_rate: float | None = None) -> None:
        if clock_rate is not None:
            raise RuntimeError("the compose target cannot change a node's clock rate")
        node = self._proc(node_id)
        if self._up.get(node_id):
            raise RuntimeError(f"node {node_id} is already running")
        _docker("start", self._cid(node_id))
        self._up[node_id] = True
        node.paused = False
        node.starts += 1

    def running(self, node_id: str) -> bool:
        return self._up.get(node_id, False)

    def kill(self, node_id: str) -> None:
        node = self._proc(node_id)
        if self._up.get(node_id):
            if node.paused:
                # A frozen container's kill would wait for the thaw.
                _docker("unpause", self._cid(node_id), check=False)
            _docker("kill", "--signal", "KILL", self._cid(node_id), check=False)
            _docker("wait", self._cid(node_id), check=False)
        self._up[node_id] = False
        node.paused = False

    def pause(self, node_id: str) -> None:
        node = self._proc(node_id)
        if self._up.get(node_id) and not node.paused:
            _docker("pause", self._cid(node_id))
            node.paused = True

    def resume(self, node_id: str) -> None:
        node = self._proc(node_id)
        if self._up.get(node_id) and node.paused:
            _docker("unpause", self._cid(node_id), check=False)
        node.paused = False

    def stop_all(self) -> None:
        for node_id in self.nodes:
            self.kill(node_id)
        self._save_logs()

    def _save_logs(self) -> None:
        for node_id, node in self.nodes.items():
            logs = _docker("logs", "--timestamps", self._cid(node_id), check=False)
            (Path(node.spec.data_dir) / "node.log").write_text(logs.stdout + logs.stderr)

    def log_tail(self, node_id: str, lines: int = 5) -> str:
        logs = _docker("logs", "--tail", str(lines), self._cid(node_id), check=False)
        return (logs.stdout + logs.stderr).strip()

    # -- network ------------------------------------------------------------------------------

    @property
    def partitionable(self) -> bool:
        return True

    def _ip(self, node_id: str) -> str:
        fmt = "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}"
        ips = _docker("inspect", "-f", fmt, self._cid(node_id)).stdout.split()
        if not ips:
            raise RuntimeError(f"{node_id} has no address (disconnected or stopped)")
        return ips[0]

    def _iptables(self, node_id: str, *rule: str) -> None:
        pid = _docker("inspect", "-f", "{{.State.Pid}}", self._cid(node_id)).stdout.strip()
        if pid in ("", "0"):
            return  # not running: nothing to filter, and heal flushes nothing
        proc = subprocess.run(["nsenter", "-t", pid, "-n", "iptables", "-w", *rule], capture_output=True,
                              text=True, timeout=DOCKER_TIMEOUT_S)
        if proc.returncode != 0:
            raise RuntimeError(f"iptables {' '.join(rule)} in {node_id} failed: {proc.stderr.strip()[:300]}")

    def _network(self, action: str, node_id: str) -> None:
        """``docker network connect|disconnect``, idempotent (a cancelled heal may have done it already)."""
        # On connect, the alias keeps the node's hostname resolvable for its peers.
        extra = ["--alias", node_id] if action == "connect" else []
        proc = _docker("network", action, *extra, self.network, self._cid(node_id), check=False)
        done_already = "already exists" in proc.stderr or "is not connected" in proc.stderr
        if proc.returncode != 0 and not done_already:
            raise RuntimeError(f"docker network {action} {node_id} failed: {proc.stderr.strip()[:300]}")

    def _isolated(self, node_id: str) -> bool:
        others = [n for n in self.nodes if n != node_id]
        return all((node_id, o) in self._drops and (o, node_id) in self._drops for o in others)

    async def drop(self, dst: str, src: str, *, syn_only: bool = False) -> None:
        if not syn_only:
            self._drops.add((dst, src))
        for node_id in (dst, src):
            if not syn_only and node_id not in self._disconnected and self._isolated(node_id):
                # Recorded first: if this task is cancelled mid-call, heal still reconnects it.
                self._disconnected.add(node_id)
                await asyncio.to_thread(self._network, "disconnect", node_id)
        if dst in self._disconnected or src in self._disconnected:
            return
        rule = ["-A", "INPUT", "-s", await asyncio.to_thread(self._ip, src)]
        if syn_only:
            rule += ["-p", "tcp", "--syn"]
        await asyncio.to_thread(self._iptables, dst, *rule, "-j", "DROP")

    async def heal(self) -> None:
        while self._disconnected:
            node_id = self._disconnected.pop()
            await asyncio.to_thread(self._network, "connect", node_id)
        self._drops.clear()
        for node_id in self.nodes:
            if self._up.get(node_id):
                await asyncio.to_thread(self._iptables, node_id, "-F", "INPUT")


def make_cluster(topology: Topology, *, faketime_lib: str | None = None) -> Cluster:
    """The Cluster for a topology: containers on the compose target, processes otherwise."""
    if topology.target == "compose":
        return ComposeCluster(topology, faketime_lib=faketime_lib)
    return Cluster(topology, faketime_lib=faketime_lib)

