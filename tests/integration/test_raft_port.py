"""Attacks on the Raft port of a running cluster (issue #20, finding 1).

Each test starts three real node processes and goes at one node's Raft port
with plain sockets, as anyone on the network could: the listener must bind
only the address asked for, refuse an oversized length prefix at once, close
a connection that drips bytes without ever authenticating, and outlive file
descriptor exhaustion.  Throughout, the cluster must keep its leader: no node
may move to a new term.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from registry.config import parse_hostport
from tests.support.cluster import Cluster, NodeProc, closed_by_peer, refusals, regctl_executable, wait_until

pytestmark = pytest.mark.integration

#: The guards' defaults (registry/raft/tcp.py RaftWireLimits): a handshake must authenticate within this.
HANDSHAKE_DEADLINE_S = 5.0


def listening(port: int) -> set[str]:
    """Local addresses with a TCP listener on ``port``, as ``ss -ltn`` shows them."""
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], check=True, capture_output=True, text=True).stdout
    return {line.split()[3] for line in out.splitlines() if line.strip()}


def terms(cluster: Cluster) -> dict[str, tuple[int, str | None]]:
    """Each node's (term, leader) as it reports them."""
    result = {}
    for node in cluster.nodes:
        status = cluster.status(node)
        result[node.node_id] = (int(status["term"]), status.get("leader"))
    return result


def steady(cluster: Cluster) -> dict[str, tuple[int, str | None]]:
    """Wait until every node agrees on one leader and term, and return what they report."""
    def agreed() -> dict[str, tuple[int, str | None]] | None:
        seen = terms(cluster)
        return seen if len(set(seen.values())) == 1 and None not in {v[1] for v in seen.values()} else None

    result = wait_until(agreed, 20.0, "every node to agree on a leader and term")
    assert result is not None
    return result


def raft_endpoint(node: NodeProc) -> tuple[str, int]:
    return parse_hostport(node.raft)


def test_raft_port_listens_only_on_the_address_asked_for(cluster: Cluster) -> None:
    for node in cluster.nodes:
        host, port = raft_endpoint(node)
        assert listening(port) == {f"{host}:{port}"}, f"{node.node_id} Raft listener on {listening(port)}"


def test_huge_length_prefixes_are_refused_at_once_and_the_leader_keeps_its_term(cluster: Cluster) -> None:
    before = steady(cluster)
    leader = cluster.wait_leader()
    target = raft_endpoint(leader)
    outcomes: list[bool] = []

    def attack() -> None:
        with socket.create_connection(target, timeout=5.0) as sock:
            # A 2 GiB frame: pysyncobj buffered (and copied, per read) everything the sender streams until then.
            sock.sendall(struct.pack("i", (1 << 31) - 1))
            junk = os.urandom(1 << 16)
            refused = False
            try:
                for _ in range(512):  # 32 MiB at most per connection
                    sock.sendall(junk)
            except (BrokenPipeError, ConnectionResetError):
                refused = True
            except TimeoutError:
                pass  # the node stopped reading but kept the connection: decided below
            outcomes.append(refused or closed_by_peer(sock, 5.0))

    threads = [threading.Thread(target=attack) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60.0)
    assert outcomes == [True] * 4, "the node kept a connection that announced a 2 GiB frame"
    after = steady(cluster)
    assert after == before, f"the cluster changed term or leader under the attack: {before} -> {after}"
    cluster.client().register("after-attack", "i1", "127.0.0.1", 8080)


def test_a_drip_that_never_authenticates_is_closed(cluster: Cluster) -> None:
    before = steady(cluster)
    node = cluster.nodes[0]
    with socket.create_connection(raft_endpoint(node), timeout=5.0) as sock:
        started = time.monotonic()
        closed = False
        # A plausible 100-byte frame, one byte every 0.25 s: every read resets pysyncobj's idle timer.
        payload = struct.pack("i", 100) + b"\x02" * 100
        for byte in payload:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            if closed_by_peer(sock, 0.25):
                closed = True
                break
            if time.monotonic() - started > HANDSHAKE_DEADLINE_S * 3:
                break
        assert closed, "a connection dripping bytes for 15 s was never closed"
        assert time.monotonic() - started < HANDSHAKE_DEADLINE_S * 3
    assert steady(cluster) == before


def refused(node: NodeProc, reason: str) -> float:
    """``regctl_raft_wire_refused_total{reason}`` on ``node``'s /metrics (0 before any)."""
    return refusals(node, "regctl_raft_wire_refused", reason)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def set_nofile(pid: int, limit: int) -> None:
    """Set the soft limit only: lowering the hard one could not be undone without CAP_SYS_RESOURCE."""
    subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={limit}:"], check=True)


def test_running_out_of_file_descriptors_does_not_close_the_raft_listener(cluster: Cluster,
                                                                         tmp_path: Path) -> None:
    before = steady(cluster)
    # n1 has the lowest Raft address, so the other nodes dial it: its listener is how they reach it.
    target = cluster.nodes[0]
    assert target.proc is not None
    host, port = raft_endpoint(target)
    original = int(subprocess.run(["prlimit", f"--pid={target.proc.pid}", "--nofile", "--raw", "--noheadings",
                                   "--output=SOFT"], check=True, capture_output=True, text=True).stdout)
    attackers: list[socket.socket] = []
    try:
        set_nofile(target.proc.pid, open_fds(target.proc.pid) + 8)
        # Far more connections than descriptors left: accept fails with EMFILE again and again.
        for _ in range(300):
            sock = socket.socket()
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.connect_ex((host, port))
            attackers.append(sock)
        # The node runs into EMFILE again and again (each failed accept is counted), and keeps listening.
        wait_until(lambda: refused(target, "accept_error") >= 3, 20.0, "n1 to fail accepts with EMFILE")
        assert listening(port) == {f"{host}:{port}"}, "the Raft listener closed under EMFILE"
    finally:
        for sock in attackers:
            sock.close()
        set_nofile(target.proc.pid, original)
    assert listening(port) == {f"{host}:{port}"}
    assert steady(cluster) == before, "the cluster changed term or leader while a node was out of descriptors"
    # A peer that restarts must reach n1 again through that listener.
    peer = cluster.nodes[2]
    cluster.kill(peer)
    cluster.start_node(peer)
    wait_until(lambda: cluster.status(target)["peers"].get(peer.raft), 30.0, f"n1 to see {peer.node_id} again")


def test_dev_refuses_a_raft_address_off_loopback(tmp_path: Path) -> None:
    # Its key is public, so a --dev node on 0.0.0.0 would run anyone's pickle: it must not start.
    result = subprocess.run(
        [regctl_executable(), "server", "--id", "n1", "--data-dir", str(tmp_path / "n1"), "--raft", "0.0.0.0:29991",
         "--peers", "127.0.0.1:29992", "--api", "127.0.0.1:29993", "--http", "127.0.0.1:29994", "--dev"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "--dev runs only with a loopback raft address" in result.stderr + result.stdout
    assert listening(29991) == set()
