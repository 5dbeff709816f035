"""Snapshot and backup files hold password and token hashes: mode 0600 (issue #20, finding 10).

Before, both were written with the process umask (0644 under the usual 022):
readable by every local user.  The nodes here run under a umask of 022.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import started_cluster
from tests.support.cluster import Cluster, regctl_executable, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def compacting_cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    old = os.umask(0o022)
    try:
        yield from started_cluster(tmp_path, request, extra_args=("--compaction-entries", "20"))
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_snapshots_and_backups_are_private(compacting_cluster: Cluster, tmp_path: Path) -> None:
    c = compacting_cluster
    client = c.client()
    client.call("acl_user_put", {"name": "ann", "password": "correct horse battery", "roles": []})
    for i in range(60):
        client.call("key_put", {"key": f"k/{i}", "value": "v"})
    snapshots = [n.data_dir / "raft.snapshot" for n in c.nodes]
    wait_until(lambda: all(p.exists() for p in snapshots), 30.0, "every node to write a snapshot")
    assert {str(p): oct(mode(p)) for p in snapshots} == {str(p): "0o600" for p in snapshots}

    backup = tmp_path / "backup.regsnap"
    proc = subprocess.run([regctl_executable(), "--endpoints", ",".join(c.endpoints), "snapshot", "save",
                           str(backup)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert oct(mode(backup)) == "0o600"
