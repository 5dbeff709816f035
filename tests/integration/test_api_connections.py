"""Client connections that never say hello cannot lock the API port (issue #20, finding 4).

Before: a connection that sent nothing was kept forever, each could hold up to
1 MiB of partial frame before its hello, and 10,000 of them (the total cap)
locked every client out, so agents lost their leases.  Now a hello is due
within ``hello_timeout_s``, at most ``hello_bytes_max`` may come before it,
and one address holds at most ``connections_per_source_max`` connections.
The attacker's sockets come from 127.0.0.2 (Linux routes all of 127/8 to the
loopback), so the test's own client on 127.0.0.1 is another source.
"""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

import pytest

from registry.config import NodeConfig
from registry.protocol import PROTOCOL_VERSION, ClientConnection, Hello
from tests.support.cluster import Cluster, NodeProc, closed_by_peer, refusals, socket_from, wait_until

pytestmark = pytest.mark.integration

#: The limits under test are the defaults the cluster's nodes run with.
DEFAULTS = NodeConfig(node_id="n", data_dir=Path("."), raft_addr="127.0.0.1:1", peers=())


def refused(node: NodeProc, reason: str) -> float:
    return refusals(node, "regctl_client_connections_refused", reason)


def attacker_socket(node: NodeProc) -> socket.socket:
    return socket_from(node.api)


def test_a_connection_that_never_says_hello_is_closed(cluster: Cluster) -> None:
    node = cluster.nodes[0]
    before = refused(node, "hello_timeout")
    with attacker_socket(node) as sock:
        started = time.monotonic()
        assert closed_by_peer(sock, DEFAULTS.hello_timeout_s + 5.0), "a silent connection was kept"
        assert time.monotonic() - started >= DEFAULTS.hello_timeout_s - 0.5
    assert refused(node, "hello_timeout") == before + 1


def test_bytes_before_the_hello_are_capped(cluster: Cluster) -> None:
    node = cluster.nodes[0]
    with attacker_socket(node) as sock:
        # A frame announced at just under the 1 MiB limit, never finished: before, all of it was buffered.
        sock.sendall(struct.pack(">I", (1 << 20) - 16))
        try:
            sock.sendall(b"\0" * (DEFAULTS.hello_bytes_max + 4096))
        except (BrokenPipeError, ConnectionResetError):
            pass
        # Closed for the bytes, well before the hello deadline.
        assert closed_by_peer(sock, DEFAULTS.hello_timeout_s / 2), "the node buffered a partial frame before hello"
    assert refused(node, "prehello_bytes") >= 1


def test_one_address_cannot_take_every_connection(cluster: Cluster) -> None:
    node = cluster.nodes[0]
    cap = DEFAULTS.connections_per_source_max
    held: list[socket.socket] = []
    # Each held connection says hello, so the hello deadline cannot free a slot while the test is
    # still opening the rest (a thousand connects can take longer than the deadline on a busy machine).
    hello = ClientConnection().send(Hello(version=PROTOCOL_VERSION, token=None, client="attacker"))
    try:
        for _ in range(cap):
            sock = attacker_socket(node)
            held.append(sock)
            sock.sendall(hello)
        # One more from the same address is closed at once ...
        with attacker_socket(node) as extra:
            assert closed_by_peer(extra, 3.0), "the per-source cap let one more connection in"
        assert refused(node, "per_source") >= 1
        # ... while a client from another address is served.
        status = cluster.status(node)
        assert status["id"] == node.node_id
    finally:
        for sock in held:
            sock.close()
    # And the slots come back once they are closed.
    def admitted() -> bool:
        with attacker_socket(node) as sock:
            return not closed_by_peer(sock, 0.3)

    wait_until(admitted, 10.0, "a slot for 127.0.0.2 again")
