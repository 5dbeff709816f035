"""Smaller hardening items on a running cluster (issue #20, finding 10)."""

from __future__ import annotations

import os
import subprocess

import pytest

from registry.errors import BadRequest
from tests.support.cluster import Cluster, regctl_executable

pytestmark = pytest.mark.integration


def test_member_add_refuses_a_raft_address_over_255_bytes(cluster: Cluster) -> None:
    # Every Raft message names its sender in a header with a one-byte length: such a member
    # could never speak, yet the cluster would count it toward every majority.
    client = cluster.client()
    with pytest.raises(BadRequest, match="longer than 255 bytes"):
        client.call("member_add", {"raft": "h" * 260 + ":7101"}, retry=False)
    leader = cluster.wait_leader()
    assert len(cluster.status(leader)["peers"]) == len(cluster.nodes) - 1


def test_service_get_escapes_terminal_control_sequences(cluster: Cluster) -> None:
    client = cluster.client()
    client.register("web", "w1", "10.0.0.1", 80, meta={"owner": "\x1b[2J\x1b]0;pwned\x07"})
    env = {k: v for k, v in os.environ.items() if k != "REGCTL_TOKEN"}
    proc = subprocess.run([regctl_executable(), "--endpoints", ",".join(cluster.endpoints), "service", "get", "web"],
                          capture_output=True, text=True, timeout=60, check=False, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout and "\x07" not in proc.stdout
    assert "\\x1b[2J" in proc.stdout
