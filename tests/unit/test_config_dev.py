"""``--dev`` (public cluster key) is refused unless the Raft address is loopback (issue #20, finding 1)."""

from __future__ import annotations

from pathlib import Path

import pytest

from registry.config import NodeConfig, is_loopback_host
from registry.errors import InvalidArgument


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.5", False),
        ("192.168.1.1", False),
        ("n1", False),  # a name may resolve to any interface
        ("localhost.example.com", False),
        ("::ffff:127.0.0.1", False),  # v4-mapped is not loopback to ipaddress; refusing it is the safe side
    ],
)
def test_is_loopback_host(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


@pytest.mark.parametrize(
    ("raft_addr", "dev", "key", "ok"),
    [
        ("127.0.0.1:7101", True, None, True),
        ("[::1]:7101", True, None, True),
        ("localhost:7101", True, None, True),
        ("0.0.0.0:7101", True, None, False),
        ("10.1.2.3:7101", True, None, False),
        ("raft-node-1:7101", True, None, False),
        ("10.1.2.3:7101", False, "a-cluster-key-of-16+", True),  # a real key may listen anywhere
        ("10.1.2.3:7101", True, "a-cluster-key-of-16+", False),  # --dev is loopback-only with or without one
    ],
)
def test_dev_needs_a_loopback_raft_address(raft_addr: str, dev: bool, key: str | None, ok: bool) -> None:
    config = NodeConfig(node_id="n1", data_dir=Path("/nonexistent"), raft_addr=raft_addr, peers=(), dev=dev,
                        cluster_key=key)
    if ok:
        config.validate()
    else:
        with pytest.raises(InvalidArgument, match="--dev runs only with a loopback raft address"):
            config.validate()
