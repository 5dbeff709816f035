"""The client-port and Raft-port limits are set from the command line (issue #20).

Each attack of test_api_connections.py and test_raft_port.py, run against
nodes started with limits far from the defaults: the node must enforce the
flag's value, not the default (a silent connection closed after 0.4 s, not
5 s; a fourth connection from one address refused, not the 1,025th).  And a
value out of range is a usage error that names the flag.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from registry.config import parse_hostport
from registry.protocol import PROTOCOL_VERSION, ClientConnection, Hello
from tests.conftest import started_cluster
from tests.support.cluster import Cluster, closed_by_peer, refusals, regctl_executable, socket_from

pytestmark = pytest.mark.integration

HELLO_TIMEOUT_S = 0.4
PER_SOURCE = 3
HANDSHAKE_TIMEOUT_S = 0.4
HANDSHAKE_BYTES = 512
#: What the defaults are (5 s for both deadlines): a close well before this proves the flag took effect.
DEFAULT_DEADLINE_S = 5.0

FLAGS = ("--hello-timeout-ms", str(HELLO_TIMEOUT_S * 1000),
         "--max-client-connections-per-source", str(PER_SOURCE),
         "--raft-handshake-timeout-ms", str(HANDSHAKE_TIMEOUT_S * 1000),
         "--max-raft-handshake-bytes", str(HANDSHAKE_BYTES))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    yield from started_cluster(tmp_path_factory.mktemp("limit-flags"), request, extra_args=FLAGS)


def test_hello_timeout_flag(cluster: Cluster) -> None:
    node = cluster.nodes[0]
    before = refusals(node, "regctl_client_connections_refused", "hello_timeout")
    with socket_from(node.api) as sock:
        started = time.monotonic()
        assert closed_by_peer(sock, DEFAULT_DEADLINE_S - 1.0), "closed only at the default hello deadline"
        assert time.monotonic() - started >= HELLO_TIMEOUT_S - 0.1
    assert refusals(node, "regctl_client_connections_refused", "hello_timeout") == before + 1


def test_per_source_flag(cluster: Cluster) -> None:
    node = cluster.nodes[1]
    hello = ClientConnection().send(Hello(version=PROTOCOL_VERSION, token=None, client="attacker"))
    held = []
    try:
        for _ in range(PER_SOURCE):
            sock = socket_from(node.api)
            sock.sendall(hello)
            held.append(sock)
        for sock in held:
            assert not closed_by_peer(sock, 0.2), "a connection under the per-source cap was closed"
        with socket_from(node.api) as extra:
            assert closed_by_peer(extra, 3.0), f"a connection past --max-client-connections-per-source {PER_SOURCE}"
    finally:
        for sock in held:
            sock.close()
    assert refusals(node, "regctl_client_connections_refused", "per_source") >= 1


def test_raft_handshake_timeout_flag(cluster: Cluster) -> None:
    node = cluster.nodes[2]
    before = refusals(node, "regctl_raft_wire_refused", "handshake_expired")
    with socket.create_connection(parse_hostport(node.raft), timeout=5.0) as sock:
        started = time.monotonic()
        assert closed_by_peer(sock, DEFAULT_DEADLINE_S - 1.0), "closed only at the default handshake deadline"
        assert time.monotonic() - started >= HANDSHAKE_TIMEOUT_S - 0.1
    assert refusals(node, "regctl_raft_wire_refused", "handshake_expired") >= before + 1


def test_raft_handshake_bytes_flag(cluster: Cluster) -> None:
    node = cluster.nodes[0]
    before = refusals(node, "regctl_raft_wire_refused", "frame_too_large")
    with socket.create_connection(parse_hostport(node.raft), timeout=5.0) as sock:
        # 600 bytes: under the default 4 KiB handshake cap, over the flag's 512.
        sock.sendall(struct.pack("i", 600))
        assert closed_by_peer(sock, 2.0 * HANDSHAKE_TIMEOUT_S + 1.0)
    assert refusals(node, "regctl_raft_wire_refused", "frame_too_large") == before + 1
    cluster.client().register("after", "i1", "127.0.0.1", 8080)  # the cluster's own Raft traffic still flows


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--hello-timeout-ms", "0"), "--hello-timeout-ms"),
        (("--hello-timeout-ms", "60001"), "--hello-timeout-ms"),
        (("--max-hello-bytes", "2000000"), "--max-hello-bytes"),
        (("--max-client-connections", "5", "--max-client-connections-per-source", "6"),
         "--max-client-connections-per-source"),
        (("--max-raft-message-bytes", "1000"), "--max-raft-message-bytes"),
        (("--max-raft-message-bytes", str(2 << 20)), "--max-raft-message-bytes"),
        (("--max-raft-handshake-bytes", "100"), "--max-raft-handshake-bytes"),
        (("--raft-handshake-timeout-ms", "-1"), "--raft-handshake-timeout-ms"),
        (("--max-raft-unauthenticated-connections", "0"), "--max-raft-unauthenticated-connections"),
    ],
)
def test_out_of_range_limits_are_usage_errors_naming_the_flag(tmp_path: Path, flags: tuple[str, ...],
                                                              message: str) -> None:
    result = subprocess.run([regctl_executable(), "server", "--id", "n1", "--data-dir", str(tmp_path / "d"),
                             "--raft", "127.0.0.1:1", "--dev", *flags], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result
    assert message in result.stderr
    assert not (tmp_path / "d").exists(), "a refused start left a data directory"
