"""What the CLI says in a user's first minutes: wrong ports, nothing listening, timeouts, bad TTLs.

Real node processes (the ``cluster`` fixture) and ``regctl`` as a subprocess.
"""

from __future__ import annotations

import socket
import subprocess
import time

import pytest

from tests.support.cluster import Cluster, regctl_executable

pytestmark = pytest.mark.integration

#: A --timeout long enough that an error arriving well before it did not wait for it.
LONG_TIMEOUT_S = 30.0


def regctl(*args: str, endpoints: list[str], timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([regctl_executable(), "--endpoints", ",".join(endpoints), *args],
                          capture_output=True, text=True, timeout=timeout_s, check=False)


def timed(*args: str, endpoints: list[str]) -> tuple[subprocess.CompletedProcess[str], float]:
    began = time.monotonic()
    proc = regctl("--timeout", str(LONG_TIMEOUT_S), *args, endpoints=endpoints)
    return proc, time.monotonic() - began


def refused_endpoint() -> str:
    """A loopback address nothing listens on (bound and released, never listened)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {proc.stderr!r}"
    return lines[0]


def test_pointed_at_the_http_port_says_so_and_names_the_api(cluster: Cluster) -> None:
    node = cluster.nodes[0]
    proc, took_s = timed("service", "list", endpoints=[node.http])
    assert proc.returncode == 3, proc.stderr
    line = one_error_line(proc)
    assert f"{node.http} answered HTTP: that is a node's HTTP port" in line, line
    assert f"serves its API at {node.api}" in line, line
    assert "FRAME_TOO_LARGE" not in line
    # A wrong port does not become right by waiting: no retrying for the whole --timeout.
    assert took_s < LONG_TIMEOUT_S / 2, f"took {took_s:.1f}s"

    # status says it per node too, and exits 3 (not ready).
    proc = regctl("status", endpoints=[node.http])
    assert proc.returncode == 3
    assert f"{node.http} answered HTTP" in proc.stderr


def test_pointed_at_the_raft_port_says_so(cluster: Cluster) -> None:
    node = cluster.nodes[1]
    proc, took_s = timed("service", "list", endpoints=[node.raft])
    assert proc.returncode == 3, proc.stderr
    line = one_error_line(proc)
    assert f"{node.raft} closed the connection without answering the hello" in line, line
    assert "Raft port" in line and "--api" in line
    assert took_s < LONG_TIMEOUT_S / 2, f"took {took_s:.1f}s"
    # One wrong endpoint among good ones is skipped: the others serve.
    proc = regctl("service", "list", endpoints=[node.raft, node.http, *cluster.endpoints])
    assert proc.returncode == 0, proc.stderr


def test_every_endpoint_refusing_fails_at_once() -> None:
    nowhere = [refused_endpoint() for _ in range(3)]
    proc, took_s = timed("service", "get", "web", endpoints=nowhere)
    assert proc.returncode == 3, proc.stderr
    line = one_error_line(proc)
    assert "connection refused by" in line and all(e in line for e in nowhere), line
    # Well before the --timeout: nothing listening is not an election.
    assert took_s < LONG_TIMEOUT_S / 2, f"took {took_s:.1f}s"


def test_writes_still_retry_through_an_election(cluster: Cluster) -> None:
    """A killed leader refuses connections, but the others answer (NOT_LEADER, UNAVAILABLE): keep trying."""
    leader = cluster.wait_leader()
    # The killed leader first in the list: the client meets its refusal before anything else.
    endpoints = [leader.api, *(n.api for n in cluster.nodes if n is not leader)]
    cluster.kill(leader)
    proc = regctl("--timeout", str(LONG_TIMEOUT_S), "service", "register", "web", "--address", "10.0.0.1:80",
                  endpoints=endpoints)
    assert proc.returncode == 0, proc.stderr


def test_a_read_that_times_out_says_timed_out_not_outcome_unknown(cluster: Cluster) -> None:
    # A revision no node will reach: the node waits for it longer than the client's --timeout.
    proc = regctl("--timeout", "1", "service", "get", "web", "--consistency", "stale", "--min-revision",
                  "1000000000", endpoints=[cluster.nodes[0].api])
    assert proc.returncode == 3, proc.stderr
    line = one_error_line(proc)
    assert "TIMEOUT" in line and "timed out" in line and "outcome unknown" not in line, line


def test_ttl_bounds_are_checked_in_the_cli_in_the_users_units(cluster: Cluster) -> None:
    for ttl in ("0s", "500ms", "25h", "999999h"):
        for args in (("service", "register", "web", "--address", "10.0.0.1:80", "--ttl", ttl),
                     ("lease", "grant", ttl)):
            proc = regctl(*args, endpoints=cluster.endpoints)
            assert proc.returncode == 2, f"{args}: exit {proc.returncode}: {proc.stderr}"
            assert "TTL must be 1s..24h" in proc.stderr, proc.stderr
    # The bounds themselves are accepted.
    for ttl in ("1s", "24h"):
        proc = regctl("lease", "grant", ttl, endpoints=cluster.endpoints)
        assert proc.returncode == 0, proc.stderr
