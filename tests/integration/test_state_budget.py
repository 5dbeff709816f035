"""One writer cannot grow the replicated state without bound (issue #20, finding 8).

Before, only record counts and lengths were capped (1M keys x 64 KiB), so a
token with write on one key prefix could run every replica out of memory at
once.  Here the nodes run with ``--max-state-bytes 1048576``: writes stop with
LIMIT_EXCEEDED near 1 MiB, every node stays up, and deleting frees room.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from registry.errors import LimitExceeded
from tests.conftest import started_cluster
from tests.support.cluster import Cluster, metric

pytestmark = pytest.mark.integration

BUDGET = 1 << 20


@pytest.fixture
def small_cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    yield from started_cluster(tmp_path, request, extra_args=("--max-state-bytes", str(BUDGET)))


def test_writes_stop_at_the_state_budget(small_cluster: Cluster) -> None:
    c = small_cluster
    client = c.client()
    written = 0
    with pytest.raises(LimitExceeded, match="state_bytes_max"):
        for i in range(200):  # 200 x 60 KB is 12 MB: far past the budget
            client.call("key_put", {"key": f"blob/{i}", "value": "x" * 60_000})
            written += 1
    assert 0 < written < 20
    for node in c.nodes:
        assert node.proc is not None and node.proc.poll() is None
    leader = c.wait_leader()
    assert 0 < metric(leader, "regctl_state_bytes") <= BUDGET
    assert metric(leader, "regctl_state_bytes_max") == BUDGET
    client.call("key_delete", {"key": "blob/0"})
    client.call("key_put", {"key": "blob/again", "value": "x" * 60_000})
