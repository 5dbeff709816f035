"""Cluster targets: where the nodes run and how faults reach them.

Two targets, one shape.  A :class:`Topology` says where each node listens,
which network namespace it lives in (none on ``local``) and where its data
is; it is built before the run and handed, as JSON, to the session that
drives traffic (which on ``netns`` runs inside the client namespace).

* ``local``: three ``regctl server`` processes on 127.0.0.1.  Faults: kill -9
  and restart, SIGSTOP/SIGCONT, clock rate through libfaketime.  Partitions
  need separate network stacks, so they are skipped on this target.
* ``netns`` (root): what ``shared/FAULTS.md`` found to work here.  A switch
  namespace holds bridge ``br0``; every node and one client get a namespace
  with a veth pair (``eth0`` inside, the peer enslaved to ``br0``) and an
  address on a subnet that exists only inside these namespaces.  Partitions
  are iptables INPUT DROP rules inside the receiving node's namespace, healed
  by flushing INPUT.  The client namespace is outside every partition.
  Namespace names carry the owning process id, so namespaces that a dead
  run left behind are recognised and removed (with their processes) before
  a new run, and never those of a run that is still alive.

``Cluster`` owns the node processes of a session: start (optionally under a
faked clock rate), kill, pause, resume, leader discovery, network rules.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from registry.client import Client
from registry.errors import Conflict, NotFound, RegistryError
from registry.server.ports import ports_free

from .lazyfs import clear_cache, unsynced_bytes

__all__ = [
    "NodeSpec",
    "Topology",
    "Cluster",
    "NetnsNetwork",
    "local_topology",
    "faketime_library",
    "iptables_available",
    "regctl_command",
]

#: Local clusters take ports from here (tests use 20000-40000, regctl up the 7000s).
# Above Linux's ephemeral range (32768-60999), so no outgoing socket takes a node's port.
LOCAL_PORT_RANGE = (61_000, 65_200)
#: Every namespace this tool creates starts with this, then the owner's pid.
NETNS_PREFIX = "jepsenlite"
#: Private subnet that exists only inside our namespaces (never routed anywhere).
NETNS_SUBNET = "10.213.0"
NETNS_CLIENT_HOST = 100
#: Ports inside a node namespace (each node has its own stack, so they can be equal).
NETNS_API_PORT, NETNS_RAFT_PORT, NETNS_HTTP_PORT = 7001, 7101, 7201
#: Status requests during leader discovery: short, a paused node must not stall the nemesis.
STATUS_TIMEOUT_S = 0.5
#: A membership change may take the node up to 10 s to commit (registry.raft.membership.CHANGE_TIMEOUT_S).
MEMBER_CALL_TIMEOUT_S = 12.0


@dataclass(frozen=True, slots=True)
class NodeSpec:
    node_id: str
    api: str
    raft: str
    http: str
    data_dir: str
    #: Network namespace of the node, or None on the local target.
    netns: str | None = None
    ip: str = "127.0.0.1"
    #: Where the node's output goes; None: ``node.log`` in its data directory.
    log_file: str | None = None
    #: The command FIFO and log of the LazyFS mount holding the data directory (disks.py), or None.
    disk_fifo: str | None = None
    disk_log: str | None = None


@dataclass(frozen=True, slots=True)
class Topology:
    target: str
    nodes: tuple[NodeSpec, ...]
    key_file: str
    client_netns: str | None = None
    #: Every namespace of the run (switch included), for teardown.
    namespaces: tuple[str, ...] = ()
    #: Nodes that are not members at the start: the membership nemesis adds and removes them.
    spares: tuple[NodeSpec, ...] = ()
    #: The docker-compose project of the compose target (compose.py), else None.
    compose_project: str | None = None

    @property
    def endpoints(self) -> list[str]:
        return [n.api for n in self.nodes]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Topology:
        nodes = tuple(NodeSpec(**n) for n in obj["nodes"])
        spares = tuple(NodeSpec(**n) for n in obj.get("spares", ()))
        return cls(obj["target"], nodes, obj["key_file"], obj.get("client_netns"), tuple(obj.get("namespaces", ())),
                   spares, obj.get("compose_project"))


def _write_key(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    key_file = root / "cluster.key"
    key_file.write_text(secrets.token_hex(16))
    key_file.chmod(0o600)
    return key_file


def local_topology(root: Path, size: int = 3, spares: int = 0) -> Topology:
    """Nodes on loopback, ports picked from a free block (the block is random, not seeded)."""
    picker = random.Random()
    for _ in range(200):
        base = picker.randrange(LOCAL_PORT_RANGE[0], LOCAL_PORT_RANGE[1] - 300, 10)
        ports = [base + off + i for i in range(1, size + spares + 1) for off in (0, 100, 200)]
        if ports_free(ports):
            break
    else:
        raise RuntimeError("no free block of loopback ports for a local cluster")
    nodes = tuple(
        NodeSpec(f"n{i}", f"127.0.0.1:{base + i}", f"127.0.0.1:{base + 100 + i}", f"127.0.0.1:{base + 200 + i}",
                 str(root / f"n{i}"))
        for i in range(1, size + spares + 1)
    )
    return Topology("local", nodes[:size], str(_write_key(root)), spares=nodes[size:])


def regctl_command() -> list[str]:
    """How to start a node: the installed console script, else the cli package as a module."""
    path = shutil.which("regctl")
    return [path] if path else [sys.executable, "-m", "cli"]


def faketime_library() -> str | None:
    """libfaketime's multithreaded preload library if the faketime package is installed.

    The library is preloaded directly rather than through the ``faketime`` wrapper so that the
    process we signal is the node itself.
    """
    if shutil.which("faketime") is None:
        return None
    for libdir in ("/usr/lib/x86_64-linux-gnu/faketime", "/usr/lib/aarch64-linux-gnu/faketime",
                   "/usr/lib/faketime", "/usr/local/lib/faketime"):
        for name in ("libfaketimeMT.so.1", "libfaketime.so.1"):
            candidate = Path(libdir) / name
            if candidate.exists():
                return str(candidate)
    return None


def iptables_available() -> bool:
    return shutil.which("iptables") is not None


def _run(cmd: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[:300]}")
    return proc


# ---------------------------------------------------------------------------------------------- netns


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class NetnsNetwork:
    """Namespaces, bridge and addresses of one run (root only).  ``teardown`` is idempotent."""

    def __init__(self, root: Path, size: int = 3, spares: int = 0) -> None:
        self.root = root
        self.size = size
        self.spares = spares
        self.owner = os.getpid()
        self.prefix = f"{NETNS_PREFIX}-{self.owner}-{secrets.token_hex(2)}"
        self.switch = f"{self.prefix}-sw"
        self.client = f"{self.prefix}-cl"
        self.node_ns = [f"{self.prefix}-n{i}" for i in range(1, size + spares + 1)]
        self.created: list[str] = []

    @staticmethod
    def check_usable() -> str | None:
        """Why this target cannot run here, or None."""
        if os.geteuid() != 0:
            return "the netns target needs root (network namespaces and iptables)"
        if shutil.which("ip") is None:
            return "the netns target needs the ip command (iproute2)"
        return None

    @staticmethod
    def list_namespaces() -> list[str]:
        out = _run(["ip", "netns", "list"], check=False).stdout
        return [line.split()[0] for line in out.splitlines() if line.strip()]

    @staticmethod
    def remove_namespace(name: str) -> None:
        pids = _run(["ip", "netns", "pids", name], check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGCONT)
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        _run(["ip", "netns", "del", name], check=False)

    @classmethod
    def remove_stale(cls) -> list[str]:
        """Remove namespaces of earlier runs whose owner process is gone; return their names."""
        removed = []
        for name in cls.list_namespaces():
            parts = name.split("-")
            if len(parts) < 3 or parts[0] != NETNS_PREFIX or not parts[1].isdigit():
                continue
            if _pid_alive(int(parts[1])):
                continue
            cls.remove_namespace(name)
            removed.append(name)
        return removed

    def _add_ns(self, name: str) -> None:
        _run(["ip", "netns", "add", name])
        self.created.append(name)
        _run(["ip", "-n", name, "link", "set", "lo", "up"])

    def setup(self) -> Topology:
        self._add_ns(self.switch)
        _run(["ip", "-n", self.switch, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", self.switch, "link", "set", "br0", "up"])
        hosts = [(ns, 10 + i) for i, ns in enumerate(self.node_ns, start=1)] + [(self.client, NETNS_CLIENT_HOST)]
        for port_no, (ns, host) in enumerate(hosts, start=1):
            self._add_ns(ns)
            peer = f"p{port_no}"
            _run(["ip", "link", "add", "name", "eth0", "netns", ns, "type", "veth", "peer", "name", peer,
                  "netns", self.switch])
            _run(["ip", "-n", self.switch, "link", "set", peer, "master", "br0"])
            _run(["ip", "-n", self.switch, "link", "set", peer, "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{NETNS_SUBNET}.{host}/24", "dev", "eth0"])
            _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        nodes = []
        for i, ns in enumerate(self.node_ns, start=1):
            ip = f"{NETNS_SUBNET}.{10 + i}"
            nodes.append(NodeSpec(f"n{i}", f"{ip}:{NETNS_API_PORT}", f"{ip}:{NETNS_RAFT_PORT}",
                                  f"{ip}:{NETNS_HTTP_PORT}", str(self.root / f"n{i}"), ns, ip))
        return Topology("netns", tuple(nodes[:self.size]), str(_write_key(self.root)), self.client,
                        tuple(self.created), tuple(nodes[self.size:]))

    def teardown(self) -> None:
        # Nodes first, then the namespaces (which takes veths, bridge and rules with them).
        for name in reversed(self.created):
            self.remove_namespace(name)
        self.created.clear()


# ---------------------------------------------------------------------------------------------- cluster


@dataclass
class _NodeProc:
    spec: NodeSpec
    proc: subprocess.Popen[bytes] | None = None
    paused: bool = False
    clock_rate: float | None = None
    starts: int = 0
    log_path: Path = field(default_factory=Path)


class Cluster:
    """The node processes of one session and the faults that can be applied to them."""

    def __init__(self, topology: Topology, *, faketime_lib: str | None = None) -> None:
        self.topology = topology
        self.faketime_lib = faketime_lib
        self.nodes = {spec.node_id: _NodeProc(spec) for spec in topology.nodes}
        #: Spare nodes (not members at the start; the membership nemesis adds them for a while).
        self.spares = {spec.node_id: _NodeProc(spec) for spec in topology.spares}
        #: How many times a node's data directory was set aside (removed from the cluster).
        self.retired: dict[str, int] = {}
        self._regctl = regctl_command()
        #: Extra environment of every node process (tests: the unsafe read mode).
        self.node_env: dict[str, str] = {}
        #: Extra server flags of every node (tests: --dev for the unsafe read mode).
        self.node_args: list[str] = []

    def _proc(self, node_id: str) -> _NodeProc:
        return self.nodes[node_id] if node_id in self.nodes else self.spares[node_id]

    @property
    def specs(self) -> list[NodeSpec]:
        return list(self.topology.nodes)

    def _command(self, spec: NodeSpec) -> list[str]:
        # A spare joins with the static members as its peers (then the leader adds it).
        others = [n for n in self.topology.nodes if n.node_id != spec.node_id]
        cmd = [*self._regctl, "server", "--id", spec.node_id, "--data-dir", spec.data_dir, "--raft", spec.raft,
               "--peers", ",".join(n.raft for n in others), "--api", spec.api, "--http", spec.http,
               "--cluster-key-file", self.topology.key_file, *self.node_args]
        for n in others:
            cmd += ["--peer-api", f"{n.raft}={n.api}"]
        if spec.netns is not None:
            cmd = ["ip", "netns", "exec", spec.netns, *cmd]
        return cmd

    def start(self, node_id: str, *, clock_rate: float | None = None) -> None:
        node = self._proc(node_id)
        if node.proc is not None and node.proc.poll() is None:
            raise RuntimeError(f"node {node_id} is already running")
        Path(node.spec.data_dir).mkdir(parents=True, exist_ok=True)
        node.log_path = Path(node.spec.log_file or Path(node.spec.data_dir) / "node.log")
        node.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.node_env}
        if clock_rate is not None:
            if self.faketime_lib is None:
                raise RuntimeError("no libfaketime: cannot change a node's clock rate")
            env["LD_PRELOAD"] = self.faketime_lib
            env["FAKETIME"] = f"+0 x{clock_rate:g}"
            env["FAKETIME_NO_CACHE"] = "1"
        with open(node.log_path, "ab") as log:
            log.write(f"--- start {node.starts + 1} at {time.time():.3f}"
                      f"{'' if clock_rate is None else f' clock x{clock_rate:g}'} ---\n".encode())
            log.flush()
            # Own session: a Ctrl-C in the terminal reaches the runner, which then stops the nodes.
            node.proc = subprocess.Popen(self._command(node.spec), stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        node.paused = False
        node.clock_rate = clock_rate
        node.starts += 1

    def start_all(self) -> None:
        for node_id in self.nodes:
            self.start(node_id)

    def running(self, node_id: str) -> bool:
        proc = self._proc(node_id).proc
        return proc is not None and proc.poll() is None

    def kill(self, node_id: str) -> None:
        """kill -9 (a paused node is continued first so the kill is not queued behind the stop)."""
        node = self._proc(node_id)
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(signal.SIGCONT)
            node.proc.kill()
            node.proc.wait()
        node.paused = False

    def power_off(self, node_ids: list[str]) -> dict[str, int]:
        """A power cut: kill -9 every node given, then drop every byte their disks had not fsynced.

        All are killed before any disk is cleared, so none of them writes
        after another one lost its data.  Returns, per node, how many bytes
        its disk dropped (LazyFS's count, whole dirty blocks).  Blocks (each
        command waits for LazyFS to answer): call from a thread in async code.
        """
        for node_id in node_ids:
            if self._proc(node_id).spec.disk_fifo is None:
                raise RuntimeError(f"node {node_id} has no LazyFS disk: a power cut needs the power nemesis's disks")
        for node_id in node_ids:
            self.kill(node_id)
        dropped: dict[str, int] = {}
        for node_id in node_ids:
            spec = self._proc(node_id).spec
            assert spec.disk_fifo is not None and spec.disk_log is not None
            dropped[node_id] = unsynced_bytes(Path(spec.disk_fifo), Path(spec.disk_log))
            clear_cache(Path(spec.disk_fifo), Path(spec.disk_log))
        return dropped

    def pause(self, node_id: str) -> None:
        node = self._proc(node_id)
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(signal.SIGSTOP)
            node.paused = True

    def resume(self, node_id: str) -> None:
        node = self._proc(node_id)
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(signal.SIGCONT)
        node.paused = False

    def stop_all(self) -> None:
        for node_id in [*self.nodes, *self.spares]:
            self.kill(node_id)

    def retire_data(self, node_id: str) -> None:
        """Set a stopped node's data directory aside (a removed member rejoins as a new, empty node)."""
        node = self._proc(node_id)
        assert not self.running(node_id), "stop the node first"
        data = Path(node.spec.data_dir)
        if data.exists():
            self.retired[node_id] = self.retired.get(node_id, 0) + 1
            data.rename(data.with_name(f"{data.name}.removed{self.retired[node_id]}"))

    # -- membership ---------------------------------------------------------------------------

    async def call_leader(self, op: str, args: dict[str, Any], deadline_s: float) -> Any:
        """Send a membership request to the leader, retrying (idempotently) until it is done.

        ``CONFLICT`` "already a member" (add) and ``NOT_FOUND`` (remove) mean an earlier attempt
        whose answer was lost went through; other errors are retried until the deadline.
        """
        end = time.monotonic() + deadline_s
        last: Exception | None = None
        while time.monotonic() < end:
            leader = await self.leader() or await self.leader_claim()
            if leader is None:
                await asyncio.sleep(0.2)
                continue
            client = Client([self._proc(leader).spec.api], timeout_s=MEMBER_CALL_TIMEOUT_S,
                            connect_timeout_s=STATUS_TIMEOUT_S, client_name="jepsen-lite-nemesis")
            try:
                _, body = await client.call(op, args, retry=False)
                return body
            except Conflict as err:
                if "already a member" in err.message:
                    return {"already": True}
                if "cannot be removed" in err.message:
                    raise RuntimeError(f"{op} {args}: {err.message}") from None  # it became the leader
                last = err
            except NotFound as err:
                if op == "member_remove":
                    return {"already": True}
                last = err
            except (RegistryError, OSError, TimeoutError) as err:
                last = err
            finally:
                await client.close()
            await asyncio.sleep(0.3)
        raise RuntimeError(f"{op} {args} did not complete within {deadline_s:g}s: {last!r}")

    async def leader_claim(self) -> str | None:
        """The running node (spares included) that says it leads, in the highest term: for when too few
        of the starting nodes answer for ``leader`` to see a majority agree."""
        ids = [nid for nid in [*self.nodes, *self.spares] if self.running(nid)]
        statuses = await asyncio.gather(*(self.status(nid) for nid in ids))
        claims = [(int(st.get("term") or 0), nid) for nid, st in zip(ids, statuses, strict=True)
                  if st and st.get("role") == "leader"]
        return max(claims)[1] if claims else None

    async def members(self) -> set[str] | None:
        """Raft addresses of the members, as the leader lists them (None if no leader answered)."""
        leader = await self.leader()
        if leader is None:
            return None
        client = Client([self.nodes[leader].spec.api], timeout_s=2.0, connect_timeout_s=STATUS_TIMEOUT_S,
                        client_name="jepsen-lite-nemesis")
        try:
            _, body = await client.call("member_list", {}, retry=False)
            return {m["raft"] for m in body["members"]}
        except (RegistryError, OSError, TimeoutError):
            return None
        finally:
            await client.close()

    async def remove_member(self, node_id: str, deadline_s: float = 20.0, wipe: bool = False) -> None:
        """Remove a member and stop it; with ``wipe``, also set its data aside.

        The nemesis keeps the data: a node that comes back under the same
        address must come back with its log and vote (members are known by
        address only, so a wiped node under a former member's address is the
        operator error of README bug 2, which only the ``rejoin-empty-voter``
        scenario commits on purpose; the cluster now refuses such a node).
        """
        await self.call_leader("member_remove", {"raft": self._proc(node_id).spec.raft}, deadline_s)
        self.kill(node_id)
        if wipe:
            self.retire_data(node_id)

    async def add_member(self, node_id: str, deadline_s: float = 20.0) -> None:
        """Start a node (on whatever data directory it has), with the static members as peers, and add it."""
        spec = self._proc(node_id).spec
        if not self.running(node_id):
            self.start(node_id)
        # As `regctl member add --api` does: read the node's data-directory
        # identity first, so the leader records it before the node can vote.
        end = time.monotonic() + deadline_s
        status = await self.status(node_id)
        while status is None and time.monotonic() < end:
            await asyncio.sleep(0.2)
            status = await self.status(node_id)
        if status is None:
            raise RuntimeError(f"{node_id} did not answer its status within {deadline_s:g}s")
        args = {"raft": spec.raft, "api": spec.api, "incarnation": status["incarnation"]}
        await self.call_leader("member_add", args, max(end - time.monotonic(), 5.0))

    async def restore_membership(self, deadline_s: float = 40.0) -> list[str]:
        """Make the members exactly the static nodes again; return what was done."""
        done: list[str] = []
        end = time.monotonic() + deadline_s
        members: set[str] | None = None
        while members is None and time.monotonic() < end:
            members = await self.members()
            if members is None:
                await asyncio.sleep(0.3)
        if members is None:
            raise RuntimeError("no leader listed the members within the deadline")
        for node_id in self.spares:
            if self.spares[node_id].spec.raft in members:
                await self.remove_member(node_id, max(end - time.monotonic(), 5.0))
                done.append(f"removed {node_id}")
            elif self.running(node_id):
                self.kill(node_id)
        for node_id, node in self.nodes.items():
            if node.spec.raft not in members:
                self.kill(node_id)
                await self.add_member(node_id, max(end - time.monotonic(), 5.0))
                done.append(f"added {node_id}")
        return done

    def exit_codes(self) -> dict[str, int | None]:
        return {nid: (n.proc.poll() if n.proc is not None else None) for nid, n in self.nodes.items()}

    # -- leader discovery ---------------------------------------------------------------------

    async def status(self, node_id: str) -> dict[str, Any] | None:
        spec = self._proc(node_id).spec
        if not self.running(node_id) or self._proc(node_id).paused:
            return None
        client = Client([spec.api], timeout_s=STATUS_TIMEOUT_S, connect_timeout_s=STATUS_TIMEOUT_S,
                        client_name="jepsen-lite-nemesis")
        try:
            return await asyncio.wait_for(client.node_status(spec.api), STATUS_TIMEOUT_S * 3)
        except (RegistryError, OSError, TimeoutError):
            return None
        finally:
            await client.close()

    async def leader(self) -> str | None:
        """The node that says it leads and that a majority of nodes agree on, or None."""
        ids = list(self.nodes)
        statuses = await asyncio.gather(*(self.status(nid) for nid in ids))
        votes: dict[str, int] = {}
        claims = []
        for nid, st in zip(ids, statuses, strict=True):
            if not st:
                continue
            if st.get("leader"):
                votes[st["leader"]] = votes.get(st["leader"], 0) + 1
            if st.get("role") == "leader":
                claims.append(nid)
        for nid in claims:
            if votes.get(self.nodes[nid].spec.raft, 0) > len(ids) // 2:
                return nid
        return None

    async def wait_leader(self, deadline_s: float) -> str | None:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            leader = await self.leader()
            if leader is not None:
                return leader
            if not any(self.running(nid) for nid in self.nodes):
                return None  # nothing left to elect anyone
            await asyncio.sleep(0.2)
        return None

    def log_tail(self, node_id: str, lines: int = 5) -> str:
        path = self._proc(node_id).log_path
        try:
            text = path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def wait_healthy(self, deadline_s: float) -> bool:
        """Every node running and answering, and a leader all of them agree on."""
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            ids = list(self.nodes)
            if not all(self.running(nid) for nid in ids):
                return False  # nobody restarts a node that exited while we wait
            statuses = await asyncio.gather(*(self.status(nid) for nid in ids))
            if all(statuses):
                leaders = {st.get("leader") for st in statuses if st}
                if len(leaders) == 1 and None not in leaders and any(
                        st and st.get("role") == "leader" for st in statuses):
                    return True
            await asyncio.sleep(0.2)
        return False

    # -- network (netns only) -----------------------------------------------------------------

    @property
    def partitionable(self) -> bool:
        return self.topology.target == "netns" and iptables_available()

    async def drop(self, dst: str, src: str, *, syn_only: bool = False) -> None:
        """Inside dst's namespace, drop what arrives from src (only new TCP connections if syn_only)."""
        dspec, sspec = self.nodes[dst].spec, self.nodes[src].spec
        assert dspec.netns is not None, "partitions need the netns target"
        cmd = ["ip", "netns", "exec", dspec.netns, "iptables", "-w", "-A", "INPUT", "-s", sspec.ip]
        if syn_only:
            cmd += ["-p", "tcp", "--syn"]
        cmd += ["-j", "DROP"]
        await asyncio.to_thread(_run, cmd)

    async def heal(self) -> None:
        for node in self.nodes.values():
            if node.spec.netns is not None:
                await asyncio.to_thread(_run, ["ip", "netns", "exec", node.spec.netns, "iptables", "-w", "-F",
                                               "INPUT"], check=False)


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
