"""Failpoints are parsed at the edge, refuse unknown names, and need --dev."""

from __future__ import annotations

from pathlib import Path

import pytest

from registry.config import NodeConfig
from registry.errors import InvalidArgument
from registry.failpoints import Failpoints


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("", Failpoints()),
        (" , ", Failpoints()),
        ("unsafe-local-reads", Failpoints(unsafe_local_reads=True)),
        ("unsafe-local-reads,unsafe-local-reads", Failpoints(unsafe_local_reads=True)),
    ],
)
def test_parse(text: str, want: Failpoints) -> None:
    assert Failpoints.parse(text) == want


@pytest.mark.parametrize("text", ["unsafe_local_reads", "no-such-fault", "unsafe-local-reads,typo"])
def test_unknown_names_are_refused_not_ignored(text: str) -> None:
    with pytest.raises(InvalidArgument, match="unknown failpoint"):
        Failpoints.parse(text)


def _config(**kw: object) -> NodeConfig:
    return NodeConfig(node_id="n1", data_dir=Path("/tmp/x"), raft_addr="10.0.0.1:7101", peers=(),
                      **kw)  # type: ignore[arg-type]


def test_a_failpoint_runs_with_a_cluster_key_off_loopback() -> None:
    # jepsen-lite's network namespaces: --dev is loopback-only, so failpoints cannot depend on it.
    _config(cluster_key="k" * 32, failpoints=Failpoints(unsafe_local_reads=True)).validate()
