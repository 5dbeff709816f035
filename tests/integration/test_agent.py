"""The agent with real processes: a cluster, echo backends each with an agent, client agents.

Instance agents check their backend over TCP every 200 ms (rise 2, fall 2)
on a 2 s lease; client agents proxy the ``echo`` service with the default
outlier settings (3 connect failures in a row eject, at most 50% ejected,
panic below 50% healthy).  Traffic is one request per connection, so every
connection is a routing decision.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from registry.agent.resolver import Resolver
from registry.client import Client
from tests.support.agents import (
    Fleet,
    Traffic,
    ask,
    backend,
    endpoint_states,
    free_ports,
    get_text,
    port_open,
    read_access_log,
    upstream_view,
)
from tests.support.cluster import Cluster, regctl_executable, wait_until

pytestmark = pytest.mark.integration

#: Access-log lines reach the file within this (the agent flushes every second).
FLUSH_S = 1.3


def start_three(fleet: Fleet, weights: tuple[int, int, int] = (1, 1, 1)) -> None:
    for i, weight in enumerate(weights, start=1):
        fleet.add_instance(f"echo-{i}", weight)


def test_traffic_spreads_per_policy(fleet: Fleet) -> None:
    """round_robin: each instance within 5% of a third; weighted (1, 1, 2): within 10% of its share."""
    start_three(fleet, weights=(1, 1, 2))
    rr_port, _ = fleet.add_client("client-rr", policy="round_robin")
    w_port, _ = fleet.add_client("client-w", policy="weighted")
    fleet.wait_healthy("client-rr", 3, 3)
    fleet.wait_healthy("client-w", 3, 3)
    rr = [ask(rr_port) for _ in range(300)]
    for name in ("echo-1", "echo-2", "echo-3"):
        assert abs(rr.count(name) - 100) <= 5, rr
    weighted = [ask(w_port) for _ in range(400)]
    for name, share in (("echo-1", 100), ("echo-2", 100), ("echo-3", 200)):
        assert abs(weighted.count(name) - share) <= share * 0.10, weighted
    # The same routing in-process: Resolver over the public client, rerouting around a dead backend.
    fleet.backends["echo-2"].kill()
    served, failed_connects = asyncio.run(resolve_many(fleet.endpoints, 60))
    assert set(served) == {"echo-1", "echo-3"} and sum(served.values()) == 60
    assert 1 <= failed_connects <= 3  # then echo-2 was ejected (or marked critical by its check)


async def resolve_many(endpoints: list[str], count: int) -> tuple[Counter[str], int]:
    """``count`` requests, each to an endpoint the resolver picks; a failed connect reroutes."""
    served: Counter[str] = Counter()
    failed = 0
    async with Client(endpoints) as client:
        resolver = Resolver(client, policy="round_robin")
        try:
            for _ in range(count):
                tried: set[str] = set()
                while True:
                    endpoint = await resolver.resolve("echo", exclude=tried)
                    try:
                        reader, writer = await asyncio.open_connection(endpoint.address, endpoint.port)
                    except OSError:
                        resolver.report(endpoint, ok=False)
                        tried.add(endpoint.id)
                        failed += 1
                        continue
                    resolver.report(endpoint, ok=True)
                    writer.write(b"hi\n")
                    served[(await reader.readline()).split(b" ")[0].decode()] += 1
                    writer.close()
                    break
        finally:
            await resolver.close()
    return served, failed


def test_kill_9_backend_then_recovery_then_lease_expiry(fleet: Fleet, cluster: Cluster) -> None:
    start_three(fleet)
    port, http = fleet.add_client("client")
    fleet.wait_healthy("client", 3, 3)
    traffic = Traffic(port)
    traffic.start()
    try:
        traffic.wait_served(50, 0.0)
        # 1. kill -9 a backend (its agent lives on: its check fails, the instance goes critical).
        fleet.backends["echo-2"].kill()
        killed_at = time.time()
        wait_until(lambda: endpoint_states(http).get("echo-2") == "critical", 10, "echo-2 critical in the client")
        critical_at = time.time()
        traffic.wait_served(50, critical_at)  # a window in which echo-2 must get nothing
        # 2. it comes back: two good checks and it is passing, and served again.
        restarted_at = time.time()
        fleet.restart_backend("echo-2")
        wait_until(lambda: endpoint_states(http).get("echo-2") == "passing", 10, "echo-2 passing again")
        back_at = time.time()
        wait_until(lambda: traffic.served(back_at)["echo-2"] >= 10, 10, "echo-2 serving again")
        # 3. kill -9 an instance's *agent*: its lease expires (2 s), the instance leaves the table.
        fleet.agents["agent-echo-3"].kill()
        wait_until(lambda: "echo-3" not in endpoint_states(http), 10, "echo-3 gone after its lease expired")
        expired_at = time.time()
        traffic.wait_served(50, expired_at)  # a window in which echo-3 must get nothing
    finally:
        traffic.stop()
    time.sleep(FLUSH_S)
    log = read_access_log(fleet.access_log("client"))

    tried = [(r["ts"] - r["duration_ms"] / 1000, r["failed"] + [r["endpoint"]]) for r in log]
    to_dead = [t for t, ids in tried if "echo-2" in ids and killed_at < t < restarted_at]
    ejected_at = max(r["ts"] for r in log if "echo-2" in r["failed"] and killed_at < r["ts"] < restarted_at)
    # Not one client connection failed after the ejection (failed connects were rerouted within the
    # connection); only the one request in flight on echo-2 when it was killed may have been cut.
    failures = traffic.failures()
    assert len(failures) <= 1 and all(killed_at - 0.1 < f.started < ejected_at for f in failures), (
        killed_at, ejected_at, failures)
    assert len(traffic.results) > 300
    # echo-2 was tried at most until ejected (3 connect failures) ...
    assert 1 <= len(to_dead) <= 3, to_dead
    assert all(t < critical_at for t in to_dead)
    # ... and never once its check had failed, until it was passing again.
    assert not [t for t, ids in tried if "echo-2" in ids and critical_at < t < restarted_at]
    assert traffic.served(back_at)["echo-2"] > 0
    # No connection went to echo-3 once its lease had expired, though its backend still runs.
    assert not [t for t, ids in tried if "echo-3" in ids and t > expired_at]
    assert traffic.served(expired_at + 0.2)["echo-3"] == 0
    # The agent counted it: connect failures and an ejection of echo-2.
    metrics = get_text(fleet.http_ports["client"])
    assert 'regctl_agent_upstream_ejections_total{endpoint="echo-2",upstream="echo"} 1.0' in metrics
    _, body = cluster.client().get_service("echo")
    assert sorted(i["id"] for i in body["instances"]) == ["echo-1", "echo-2"]


def test_leader_kill_does_not_interrupt_traffic(fleet: Fleet, cluster: Cluster) -> None:
    start_three(fleet)
    port, http = fleet.add_client("client")
    fleet.wait_healthy("client", 3, 3)
    traffic = Traffic(port)
    traffic.start()
    try:
        traffic.wait_served(30, 0.0)
        leader = cluster.wait_leader()
        cluster.kill(leader)
        killed_at = time.time()
        time.sleep(3.0)  # longer than the lease TTL: keepalives must have reached the new leader
        # The client agent's watch resumed on another node: a status change still reaches it.
        survivors = [n.api for n in cluster.nodes if n is not leader]
        client = cluster.client(survivors)
        client.call("set_status", {"service": "echo", "id": "echo-1", "status": "critical", "note": "test"})
        _, body = client.get_service("echo")
        assert len(body["instances"]) == 3  # no lease expired because leadership moved
        wait_until(lambda: endpoint_states(http).get("echo-1") == "critical", 10, "echo-1 critical in the client")
        moved_at = time.time()
        traffic.wait_served(30, moved_at)  # a window in which echo-1 must get nothing
    finally:
        traffic.stop()
    assert traffic.failures() == [], traffic.failures()[:5]
    assert sum(traffic.served(killed_at).values()) > 100
    assert traffic.served(moved_at + 0.1)["echo-1"] == 0


def test_whole_cluster_down_keeps_serving_then_catches_up(fleet: Fleet, cluster: Cluster) -> None:
    start_three(fleet)
    port, http = fleet.add_client("client")
    fleet.wait_healthy("client", 3, 3)
    traffic = Traffic(port)
    traffic.start()
    try:
        traffic.wait_served(30, 0.0)
        for node in cluster.nodes:
            cluster.kill(node)
        down_at = time.time()
        time.sleep(2.5)  # the fault itself: the whole cluster stays down this long
        served_while_down = traffic.served(down_at)
        for node in cluster.nodes:
            cluster.start_node(node)
        cluster.wait_leader()
        # The restarted leader restarted every lease's countdown: the instances are still there.
        cluster.client().call("set_status", {"service": "echo", "id": "echo-3", "status": "critical", "note": "test"})
        wait_until(lambda: endpoint_states(http).get("echo-3") == "critical", 15, "the client to catch up")
    finally:
        traffic.stop()
    assert traffic.failures() == [], traffic.failures()[:5]
    assert set(served_while_down) == {"echo-1", "echo-2", "echo-3"}  # the last known table, all of it


def test_unknown_upstream_is_a_config_error(tmp_path: Path, cluster: Cluster) -> None:
    """A misspelt upstream fails the start (exit 2) instead of a proxy that refuses everything forever."""
    (port,) = free_ports(1)
    proc = subprocess.run([regctl_executable(), "--endpoints", ",".join(cluster.endpoints), "agent",
                           "--upstream", f"no-such-svc={port}"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "upstream no-such-svc: no such service in the registry" in proc.stderr, proc.stderr
    assert port_open(port) is False  # it let go of its listener


def test_empty_upstream_may_fill_later_and_sigterm_deregisters(fleet: Fleet, cluster: Cluster) -> None:
    # The service exists (it outlives its last instance) but has no instances yet.
    client = cluster.client()
    client.register("later", "placeholder", "127.0.0.1", 1)
    client.deregister("later", "placeholder")
    port, http = fleet.add_client("client", upstream="later")
    wait_until(lambda: upstream_view(http)["listed"], 20, "the first listing")
    assert upstream_view(http)["total"] == 0
    with pytest.raises(OSError):
        ask(port)  # nothing to route to yet: the connection is reset
    fleet.add_instance("later-1")
    wait_until(lambda: port_open(fleet.ports["later-1"]), 10, "the backend to listen")
    # add_instance registers service "echo"; register a "later" instance on the same backend by hand.
    client.register("later", "later-1", "127.0.0.1", fleet.ports["later-1"])
    wait_until(lambda: upstream_view(http)["healthy"] == 1, 10, "the new service in the table")
    assert ask(port) == "later-1"
    # SIGTERM: the agent revokes its lease before it exits, so its instance is gone at once, not at expiry.
    wait_until(lambda: client.get_service("echo")[1]["instances"], 10, "echo/later-1 registered by its agent")
    assert fleet.agents["agent-later-1"].terminate() == 0
    _, body = client.get_service("echo")
    assert body["instances"] == []


CONFIG_ERRORS = [
    (["--service", "web", "--address", "127.0.0.1:1", "--check", "ping:x"], "bad check 'ping:x'"),
    (["--service", "web", "--address", "127.0.0.1:1", "--check", "tcp:nowhere"], "tcp:HOST:PORT"),
    (["--upstream", "api=9001:fastest"], "unknown load-balancing policy 'fastest'"),
    (["--upstream", "api"], "bad upstream 'api'"),
    (["--service", "web"], "--service needs --address"),
    ([], "nothing to do"),
]


def test_config_errors_exit_2_with_a_clear_message(tmp_path: Path) -> None:
    """Bad flags, and ports in use (upstream, --http): exit code 2 and one clear line on stderr."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        busy = sock.getsockname()[1]
        (free,) = free_ports(1)
        cases = [
            *CONFIG_ERRORS,
            (["--upstream", f"api={busy}"], f"upstream api: cannot listen on 127.0.0.1:{busy}: address already in use"),
            (["--upstream", f"api={free}", "--http", f"127.0.0.1:{busy}"],
             f"cannot listen on --http 127.0.0.1:{busy}: address already in use"),
        ]
        # All at once: each is a process start, and they are independent.
        procs = [subprocess.Popen([regctl_executable(), "--endpoints", "127.0.0.1:1", "agent", *args],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for args, _ in cases]
        try:
            for proc, (args, message) in zip(procs, cases, strict=True):
                _, stderr = proc.communicate(timeout=60)
                assert proc.returncode == 2, (args, stderr)
                assert stderr.startswith("error: agent configuration: ") and message in stderr, (args, stderr)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()


def test_demo_backend_and_sigint(tmp_path: Path) -> None:
    """The echo backend the demo uses answers, and stops on SIGINT."""
    (port,) = free_ports(1)
    proc = backend(tmp_path, "e", port).start()
    try:
        wait_until(lambda: ask(port) == "e", 10, "the backend")
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGINT)
        assert proc.proc.wait(timeout=10) == 0
    finally:
        proc.kill()
