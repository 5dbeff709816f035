"""A member whose data directory was wiped cannot rejoin as itself (bug 2), only through remove + add.

Real processes: a three-node cluster; one follower is killed, its data
directory deleted and the same command started again, as an operator who
"just restarts" a node with a lost disk would.
"""

from __future__ import annotations

import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from registry.client import SyncClient
from registry.raft.incarnation import INCARNATION_FILE
from registry.server.ports import free_ports
from tests.integration.test_ops import ok_json, regctl
from tests.support.cluster import Cluster, NodeProc, regctl_executable, wait_until

_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def recorded(endpoints: list[str]) -> dict[str, str | None]:
    """Raft address -> recorded identity of every member, as `regctl member list` shows them."""
    listing = ok_json("member", "list", endpoints=endpoints)
    return {m["raft"]: m["incarnation"] for m in listing["members"]}


def refused_count(node: NodeProc) -> float:
    with _HTTP.open(f"http://{node.http}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(float(line.split()[1]) for line in text.splitlines()
               if line.startswith("regctl_raft_peers_refused_total"))


def register(client: SyncClient, count: int, tag: str) -> dict[str, int]:
    acked: dict[str, int] = {}
    for i in range(count):
        out: dict[str, Any] = client.register("idsvc", f"{tag}{i}", "10.1.0.1", 8000 + i)
        acked[f"{tag}{i}"] = int(out["revision"])
    return acked


def test_wiped_member_is_refused_until_removed_and_re_added(cluster: Cluster) -> None:
    client = cluster.client()
    identities = {n.raft: cluster.status(n)["incarnation"] for n in cluster.nodes}
    # The leader records every member's identity on first contact.
    cluster.wait_identities_recorded()
    assert recorded(cluster.endpoints) == identities
    shown = ok_json("status", endpoints=cluster.endpoints)
    assert {n["api"]: (n["incarnation"], n["incarnation_recorded"]) for n in shown} == {
        n.api: (identities[n.raft], True) for n in cluster.nodes}
    acked = register(client, 20, "before-")

    leader = cluster.wait_leader()
    victim = next(n for n in cluster.nodes if n is not leader)
    others = [n for n in cluster.nodes if n is not victim]
    cluster.kill(victim)
    shutil.rmtree(victim.data_dir)
    cluster.start_node(victim)  # same address, same flags, empty disk
    wait_until(lambda: cluster.status(victim), 20, "the wiped node to answer status")
    new_identity = cluster.status(victim)["incarnation"]
    assert new_identity != identities[victim.raft]

    # Its peers refuse its Raft traffic, say so in their logs and metrics, and keep the old record.
    wait_until(lambda: any(refused_count(n) > 0 for n in others), 20, "a peer to refuse the wiped node")
    wait_until(lambda: any(f"refusing Raft traffic from {victim.raft}" in n.log_path.read_text() for n in others),
               10, "the refusal in a peer's log")
    assert recorded([n.api for n in others])[victim.raft] == identities[victim.raft]
    assert cluster.status(victim)["incarnation_recorded"] is False
    # The two others still make a majority: writes go on.
    acked.update(register(cluster.client([n.api for n in others]), 10, "during-"))

    # The documented way back: remove the address, then add the node (its new identity is recorded).
    ok_json("member", "remove", victim.raft, endpoints=[n.api for n in others])
    assert victim.raft not in recorded([n.api for n in others])
    ok_json("member", "add", victim.raft, "--api", victim.api, endpoints=[n.api for n in others])
    assert recorded([n.api for n in others])[victim.raft] == new_identity
    acked.update(register(client, 10, "after-"))
    last = max(acked.values())
    wait_until(lambda: int(cluster.status(victim)["revision"]) >= last, 30, "the re-added node to catch up")
    assert cluster.status(victim)["incarnation_recorded"] is True
    with SyncClient([victim.api], timeout_s=10.0, connect_timeout_s=0.5) as direct:
        _, body = direct.get_service("idsvc", consistency="stale")
    assert {i["id"]: i["mod_revision"] for i in body["instances"]} == acked


def test_member_add_checks_the_api_it_reads_the_identity_from(cluster: Cluster) -> None:
    """`member add RAFT --api API` checks that API belongs to RAFT: a typo must not record a wrong identity.

    Without --api the CLI says when the identity will be recorded instead.
    """
    proc = regctl("member", "add", "127.0.0.1:1", "--api", cluster.nodes[0].api,
                                                    endpoints=cluster.endpoints)
    assert proc.returncode == 1
    assert f"has Raft address {cluster.nodes[0].raft}, not 127.0.0.1:1" in proc.stderr
    assert "127.0.0.1:1" not in recorded(cluster.endpoints)
    # Without --api nothing can be read beforehand: the CLI says when the identity will be recorded.
    proc = regctl("member", "add", "127.0.0.1:1", endpoints=cluster.endpoints)
    assert proc.returncode == 0, proc.stderr
    assert "recorded when it first talks to the leader" in proc.stderr
    assert recorded(cluster.endpoints)["127.0.0.1:1"] is None  # a member nobody runs: never recorded
    ok_json("member", "remove", "127.0.0.1:1", endpoints=cluster.endpoints)
    assert "127.0.0.1:1" not in recorded(cluster.endpoints)


def test_server_refuses_a_corrupt_identity_file_and_an_overlong_raft_address(tmp_path: Path) -> None:
    """Both are usage errors (exit 2, one clear line, no traceback), and the identity file is left as it was."""
    api, raft, http = free_ports(3)

    def server(data: Path, raft_addr: str) -> list[str]:
        return [regctl_executable(), "server", "--id", "t1", "--data-dir", str(data), "--raft", raft_addr,
                "--api", f"127.0.0.1:{api}", "--http", f"127.0.0.1:{http}", "--dev"]

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / INCARNATION_FILE).write_text("zz\n")
    long_host = "h" * 260
    cases = [
        (server(corrupt, f"127.0.0.1:{raft}"), "corrupt incarnation file"),
        (server(tmp_path / "long", f"{long_host}:{raft}"), "raft address longer than 255 bytes"),
    ]
    for cmd, message in cases:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and message in proc.stderr, (proc.returncode, proc.stderr)
        assert "Traceback" not in proc.stderr
    assert (corrupt / INCARNATION_FILE).read_text() == "zz\n"
