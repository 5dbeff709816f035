"""Intentions enforced by the agent's proxies, picked up from a watch (real processes)."""

from __future__ import annotations

import pytest

from tests.support.agents import Fleet, ask, port_open
from tests.support.cluster import Cluster, wait_until

pytestmark = pytest.mark.integration


def refused(port: int) -> bool:
    try:
        ask(port, timeout_s=1.0)
    except OSError:
        return True
    return False


def test_intention_deny_blocks_proxied_connections_and_delete_lets_them_through(
    fleet: Fleet, cluster: Cluster
) -> None:
    fleet.add_instance("echo-1")
    wait_until(lambda: port_open(fleet.ports["echo-1"]), 10, "the backend to listen")
    port, _ = fleet.add_client("client")
    fleet.wait_healthy("client", 1)
    assert ask(port) == "echo-1"
    admin = cluster.client()

    admin.call("intention_put", {"source": "client", "destination": "echo", "action": "deny"})
    # Through the agent's intentions watch: a deadline on the condition, not a timing assert.
    wait_until(lambda: refused(port), 5, "the deny to reach the agent", interval_s=0.02)
    assert refused(port)
    # Other pairs are untouched, and the CLI-visible check agrees.
    assert admin.call("intention_check", {"source": "client", "destination": "echo"})[1]["action"] == "deny"
    assert admin.call("intention_check", {"source": "other", "destination": "echo"})[1]["action"] == "allow"

    admin.call("intention_delete", {"source": "client", "destination": "echo"})
    wait_until(lambda: not refused(port), 5, "the delete to reach the agent", interval_s=0.02)
    assert ask(port) == "echo-1"

    # A deny-by-default cluster blocks pairs without an allow; an explicit allow opens one.
    admin.call("intention_default_set", {"action": "deny"})
    wait_until(lambda: refused(port), 5, "the default deny to reach the agent", interval_s=0.02)
    admin.call("intention_put", {"source": "client", "destination": "echo", "action": "allow"})
    wait_until(lambda: not refused(port), 5, "the allow to reach the agent", interval_s=0.02)
