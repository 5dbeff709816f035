"""The CLI never sends its token to an address read from the cluster's data (issue #20, finding 6).

``regctl member add|remove`` followed the NOT_LEADER hint, and ``member list``
asked every member's API, with the caller's token (and without its TLS
settings).  Those addresses come from ``--peer-api`` or, without it, from keys
under ``_cluster/members/``, which any client may write when ACLs are off.
Here the nodes run without ``--peer-api`` and the key naming the leader's API
points at a listener the test owns: whatever reaches it is recorded.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from registry.raft.membership import MEMBER_KEY_PREFIX
from tests.support.cluster import Cluster, NodeProc, regctl_executable

pytestmark = pytest.mark.integration

SECRET = "tok-0123456789-do-not-leak"


class NoPeerApiCluster(Cluster):
    """Nodes that learn each other's API addresses only from the replicated keys."""

    def command(self, node: NodeProc) -> list[str]:
        cmd = super().command(node)
        out: list[str] = []
        skip = False
        for arg in cmd:
            if skip:
                skip = False
                continue
            if arg == "--peer-api":
                skip = True
                continue
            out.append(arg)
        return out


@pytest.fixture
def cluster_without_peer_apis(tmp_path: Path) -> Iterator[Cluster]:
    c = NoPeerApiCluster(tmp_path / "cluster", 3)
    try:
        c.start()
        yield c
    finally:
        c.close()


class Trap:
    """A listener that records every byte sent to it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.received = bytearray()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(1.0)
                try:
                    while chunk := conn.recv(65536):
                        self.received += chunk
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self.sock.close()


def regctl(endpoints: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "REGCTL_TOKEN"}
    return subprocess.run([regctl_executable(), "--endpoints", ",".join(endpoints), "--token", SECRET,
                           "--timeout", "3", *args], capture_output=True, text=True, timeout=60, check=False, env=env)


def test_member_commands_do_not_send_the_token_where_cluster_data_points(cluster_without_peer_apis: Cluster) -> None:
    c = cluster_without_peer_apis
    leader = c.wait_leader()
    follower = next(n for n in c.nodes if n is not leader)
    trap = Trap()
    try:
        client = c.client()
        # Anyone may write this key with ACLs off: the leader's API is now "at" the trap.
        client.call("key_put", {"key": MEMBER_KEY_PREFIX + leader.raft, "value": trap.address})
        for node in c.nodes:
            if node is not leader:
                client.call("key_put", {"key": MEMBER_KEY_PREFIX + node.raft, "value": trap.address})
        added = regctl([follower.api], "member", "add", "127.0.0.1:1")
        assert added.returncode != 0
        assert "not among --endpoints" in added.stderr
        listed = regctl([follower.api], "member", "list")
        assert listed.returncode == 0, listed.stderr
    finally:
        trap.close()
    assert SECRET.encode() not in bytes(trap.received), "the token was sent to an address read from the cluster"



def test_a_hint_read_from_the_cluster_is_printed_escaped(cluster_without_peer_apis: Cluster) -> None:
    # The leader's API address comes from a key any client may write: it reaches the terminal escaped.
    c = cluster_without_peer_apis
    leader = c.wait_leader()
    follower = next(n for n in c.nodes if n is not leader)
    c.client().call("key_put", {"key": MEMBER_KEY_PREFIX + leader.raft, "value": "\x1b]0;pwned\x07"})
    proc = regctl([follower.api], "member", "add", "127.0.0.1:1")
    assert proc.returncode != 0
    assert "\x1b" not in proc.stderr and "\x07" not in proc.stderr, proc.stderr
    assert "\\x1b]0;pwned\\x07" in proc.stderr
