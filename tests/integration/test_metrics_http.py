"""What Prometheus sees from real nodes: default collectors, build info, leader changes and contact, http_sd.

Scrapes each node's HTTP port of a ``cluster`` of real processes.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from tests.support.build import installed_build
from tests.support.cluster import Cluster, NodeProc, wait_until

pytestmark = pytest.mark.integration

#: No proxy for loopback scrapes, whatever the environment says.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get(addr: str, path: str) -> bytes:
    try:
        with _HTTP.open(f"http://{addr}{path}", timeout=5.0) as resp:
            body: bytes = resp.read()
            return body
    except urllib.error.HTTPError as err:
        # An error status (a node not ready yet) holds its response open; wait_until keeps the
        # error as its last one, so close it here or its socket is left for the GC to warn about.
        err.close()
        raise


def samples(node: NodeProc) -> dict[str, float]:
    """Every sample of the node's /metrics, by its name with labels."""
    out = {}
    for line in get(node.http, "/metrics").decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_every_node_exports_process_gc_and_build_info_and_no_created_series(cluster: Cluster) -> None:
    installed = installed_build()  # what the nodes run (#24)
    for node in cluster.nodes:
        text = get(node.http, "/metrics").decode()
        for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds",
                     "process_start_time_seconds", "python_gc_objects_collected_total", "python_info",
                     "regctl_build_info", "regctl_raft_leader_changes_total",
                     "regctl_raft_leader_contact_age_seconds"):
            assert f"\n{name}" in text, f"{node.node_id}: no {name}"
        assert "_created" not in text, [line for line in text.splitlines() if "_created" in line][:5]
        build = next(line for line in text.splitlines() if line.startswith("regctl_build_info{"))
        assert 'pysyncobj="0.3.17"' in build and 'version="' in build and build.endswith(" 1.0")
        assert f'build="{installed}"' in build, build


def test_leader_changes_and_leader_contact(cluster: Cluster) -> None:
    leader = cluster.wait_leader()
    followers = [n for n in cluster.nodes if n is not leader]
    assert samples(leader)["regctl_raft_leader_contact_age_seconds"] == 0.0
    # A follower hears the leader's heartbeats: its contact age stays well under an election timeout.
    wait_until(lambda: all(samples(f)["regctl_raft_leader_contact_age_seconds"] < 1.0 for f in followers), 10,
               "followers in contact with the leader")
    before = {f.node_id: samples(f)["regctl_raft_leader_changes_total"] for f in followers}
    assert all(v >= 1 for v in before.values()), before  # the first leader they saw
    cluster.kill(leader)
    new_leader = cluster.wait_leader()
    survivor = next(f for f in followers if f is not new_leader)
    wait_until(lambda: samples(survivor)["regctl_raft_leader_changes_total"] > before[survivor.node_id], 10,
               "the surviving follower to count the leader change")
    assert samples(new_leader)["regctl_raft_leader_changes_total"] > before[new_leader.node_id]


def test_http_sd_from_any_node_gives_the_same_targets(cluster: Cluster) -> None:
    client = cluster.client()
    for i in range(3):
        client.register("web", f"w{i}", f"10.0.0.{i + 1}", 8080, tags=["blue"], meta={"zone": "a"})
    client.register("db", "d1", "10.0.1.1", 5432)
    client.set_status("web", "w2", "critical")
    # Prometheus is given every node's URL (docs/operations.md): any two must agree.
    first, second = (json.loads(get(n.http, "/v1/sd")) for n in cluster.nodes[:2])
    assert first == second
    targets = sorted(t for group in first for t in group["targets"])
    assert targets == ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.1.1:5432"]  # w2 is critical: not a target
    # With one node gone the other URLs keep answering the same.
    cluster.kill(cluster.nodes[0])
    wait_until(lambda: json.loads(get(cluster.nodes[1].http, "/v1/sd")) == first, 15,
               "the remaining nodes to serve the same targets")
    assert json.loads(get(cluster.nodes[2].http, "/v1/sd")) == first
