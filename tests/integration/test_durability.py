"""The fsynced Raft log on real node processes (#18): kill -9 under load, corruption, a foreign journal, a full disk.

Power loss itself is test_power_loss.py (LazyFS); here every fault is one a
plain file system can show: the page cache survives ``kill -9``, a byte is
flipped on disk by hand, a tmpfs fills up.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from registry.client import SyncClient
from registry.errors import RegistryError
from registry.raft.log import scan_segment
from tests.support.cluster import Cluster, NodeProc, metric, wait_until

pytestmark = pytest.mark.integration

#: Exit status of a node whose Raft log cannot be written (registry.raft.node.EXIT_LOG_FAILED).
EXIT_LOG_FAILED = 74


def last_segment(node: NodeProc) -> Path:
    segments = sorted((node.data_dir / "raft-log").glob("*.seg"))
    assert segments, f"no raft log segments in {node.data_dir}"
    return segments[-1]


def run_once(cluster: Cluster, node: NodeProc, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    """Start ``node`` in the foreground and wait for it to exit (it is expected to refuse to start)."""
    return subprocess.run(cluster.command(node), capture_output=True, text=True, timeout=timeout_s,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, check=False)


def test_kill_all_during_a_write_load_loses_no_acknowledged_write(cluster: Cluster) -> None:
    acked: set[str] = set()
    lock = threading.Lock()
    stop = threading.Event()

    def writer(name: str) -> None:
        with SyncClient(cluster.endpoints, timeout_s=2.0, connect_timeout_s=0.3) as client:
            i = 0
            while not stop.is_set():
                iid = f"{name}-{i}"
                i += 1
                try:
                    client.register("load", iid, "10.0.0.1", 1000)
                except (RegistryError, OSError):
                    continue  # unknown outcome: neither counted nor required
                with lock:
                    acked.add(iid)

    threads = [threading.Thread(target=writer, args=(f"w{k}",), daemon=True) for k in range(4)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(acked) >= 200, 30, "200 acknowledged writes under load")
        # The log is ours and fsynced: segments, no pysyncobj journal, fdatasyncs counted.
        for node in cluster.nodes:
            assert last_segment(node).stat().st_size > 0
            assert not (node.data_dir / "raft.journal").exists()
        leader = cluster.wait_leader()
        assert metric(leader, "regctl_wal_fsync_duration_seconds_count") > 0
        assert metric(leader, "regctl_wal_fsync_records_sum") >= metric(leader, "regctl_wal_fsync_records_count")
        for node in cluster.nodes:  # mid-load, back to back
            cluster.kill(node)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
    with lock:
        expected = set(acked)
    for node in cluster.nodes:
        cluster.start_node(node)
    cluster.wait_leader(30)
    with SyncClient(cluster.endpoints, timeout_s=15.0, connect_timeout_s=0.5) as reader:
        _, body = reader.get_service("load")
    found = {inst["id"] for inst in body["instances"]}
    missing = sorted(expected - found)
    assert not missing, f"{len(missing)} acknowledged writes lost by kill -9 of every node under load: {missing[:10]}"


def test_corruption_in_the_middle_of_a_segment_refuses_to_start(cluster: Cluster) -> None:
    client = cluster.client()
    for i in range(20):
        client.register("c", f"c{i}", "10.0.0.1", 1000 + i)
    victim = cluster.nodes[0]
    assert cluster.stop(victim) == 0
    segment = last_segment(victim)
    data = bytearray(segment.read_bytes())
    records = scan_segment(bytes(data)).records
    assert len(records) >= 5
    middle = records[len(records) // 2]
    data[middle.offset + 12] ^= 0x40  # a payload byte: its CRC no longer matches, valid records follow
    segment.write_bytes(bytes(data))

    done = run_once(cluster, victim)
    assert done.returncode == 1, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if "refusing to start" in line]
    assert len(lines) == 1, done.stderr[-2000:]
    assert str(segment) in lines[0] and f"byte offset {middle.offset}" in lines[0]
    assert "Traceback" not in done.stderr
    # The other two still serve; the damaged file is left as it was for the operator.
    client.register("c", "after", "10.0.0.1", 2000)
    assert segment.read_bytes() == bytes(data)


def test_unsafe_no_fsync_writes_the_log_without_fsyncs_and_says_so(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path / "c", 1, key=None, extra_args=("--unsafe-no-fsync",))
    try:
        cluster.start()
        node = cluster.nodes[0]
        client = cluster.client()
        for i in range(20):
            client.register("u", f"u{i}", "10.0.0.1", 1000 + i)
        assert last_segment(node).stat().st_size > 1000  # written all the same
        assert metric(node, "regctl_wal_fsync_duration_seconds_count") == 0
        assert "UNSAFE: --unsafe-no-fsync" in node.log_path.read_text(errors="replace")
    finally:
        cluster.close()


def test_a_data_dir_with_a_pysyncobj_journal_refuses_to_start(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path / "c", 1, key=None)
    node = cluster.nodes[0]
    node.data_dir.mkdir(parents=True)
    (node.data_dir / "raft.journal").write_bytes(b"PYSYNCOBJ" + bytes(100))
    done = run_once(cluster, node)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "raft.journal" in done.stderr and "refusing to start" in done.stderr
    assert not (node.data_dir / "raft-log").exists()


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_stops_the_node_before_it_acknowledges(tmp_path: Path, small_tmpfs: Path) -> None:
    """Documented in docs/durability.md: the node exits (status 74) and is restarted once there is space."""
    cluster = Cluster(tmp_path / "c", 1, key=None)
    node = cluster.nodes[0]
    node.data_dir = small_tmpfs / "n1"
    node.data_dir.mkdir()
    node.log_path = tmp_path / "n1.log"  # off the full disk, so the node can say why it stopped

    def start() -> None:
        with open(node.log_path, "ab") as log:
            node.proc = subprocess.Popen(cluster.command(node), stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})

    try:
        start()
        cluster.wait_leader(30)
        value = "v" * 32_000
        acked: dict[str, str] = {}
        refused: list[BaseException] = []
        with SyncClient(cluster.endpoints, timeout_s=5.0, connect_timeout_s=0.3) as client:
            for i in range(200):  # 200 x 32 kB is three times the file system
                key = f"k{i}"
                try:
                    client.call("key_put", {"key": key, "value": f"{i}:{value}"})
                except (RegistryError, OSError) as err:
                    refused.append(err)
                    break
                acked[key] = f"{i}:{value}"
        assert refused, "the disk never filled"
        assert acked, "nothing was written before the disk filled"
        assert node.proc is not None
        assert node.proc.wait(timeout=30) == EXIT_LOG_FAILED
        log_text = node.log_path.read_text(errors="replace")
        assert "ENOSPC" in log_text and "acknowledges nothing it could not persist" in log_text

        # Space is back: the node replays its log (cutting the torn tail) and has every acknowledged write.
        subprocess.run(["mount", "-o", "remount,size=16m", str(small_tmpfs)], check=True)
        start()
        cluster.wait_leader(30)
        with SyncClient(cluster.endpoints, timeout_s=10.0, connect_timeout_s=0.3) as client:
            for key, expected in acked.items():
                _, body = client.call("key_get", {"key": key})
                assert body["value"] == expected, key
            client.call("key_put", {"key": "after", "value": "x"})
    finally:
        cluster.close()
