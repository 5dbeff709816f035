"""Table tests of the pure parts of jepsen-lite's LazyFS harness: config, log and mountinfo parsing, skip reasons."""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path

import pytest

# The folder name has a dash, so it cannot be imported as a package: put it on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "jepsen-lite"))

from jepsenlite.disks import NodeDisks
from jepsenlite.lazyfs import (
    LazyFSError,
    cleared_count,
    config_toml,
    lazyfs_mount_points,
    mounted_paths,
    unavailable_reason,
    unsynced_reports,
)
from jepsenlite.nemesis import ALL_KINDS, KINDS, plan, power_victims
from jepsenlite.runner import Topology, local_topology

BIN = Path("/opt/lazyfs/lazyfs")


@pytest.mark.parametrize(("facts", "expected"), [
    ({}, None),
    ({"dev_fuse": False}, "/dev/fuse is missing"),
    ({"dev_fuse": False, "root": False}, "/dev/fuse is missing"),
    ({"root": False}, "needs root"),
    ({"binary_found": False}, "/opt/lazyfs/lazyfs is missing (build it: shared/tools/lazyfs/build.sh /opt/lazyfs"),
    ({"fusermount_found": False}, "fusermount3 is missing"),
])
def test_unavailable_reason_names_the_first_missing_piece(facts: dict[str, bool], expected: str | None) -> None:
    given = {"dev_fuse": True, "root": True, "binary_found": True, "fusermount_found": True, **facts}
    reason = unavailable_reason(binary=BIN, **given)
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and expected in reason


def test_config_is_the_documented_toml() -> None:
    text = config_toml(Path("/s/faults.fifo"), Path("/s/lazyfs.log"), 64)
    assert tomllib.loads(text) == {
        "faults": {"fifo_path": "/s/faults.fifo"},
        "cache": {"apply_eviction": False, "simple": {"custom_size": "64mb", "blocks_per_page": 1}},
        "filesystem": {"log_all_operations": False, "logfile": "/s/lazyfs.log"},
    }
    # No "completed" FIFO: LazyFS would block until someone reads it.
    assert "completed" not in text


@pytest.mark.parametrize("odd", ['/tmp/a "quoted" dir', "/tmp/back\\slash", "/tmp/space dir/ünï"])
def test_config_quotes_paths(odd: str) -> None:
    text = config_toml(Path(odd) / "f", Path(odd) / "l", 8)
    parsed = tomllib.loads(text)
    assert parsed["faults"]["fifo_path"] == f"{odd}/f"
    assert parsed["filesystem"]["logfile"] == f"{odd}/l"


@pytest.mark.parametrize(("fifo", "log", "cache_mb", "message"), [
    ("relative/fifo", "/abs/log", 8, "absolute paths"),
    ("/abs/fifo", "relative.log", 8, "absolute paths"),
    ("/abs/fifo", "/abs/log", 0, "cache_mb must be positive"),
    ("/abs/new\nline", "/abs/log", 8, "control character"),
])
def test_config_refuses_what_lazyfs_would_misread(fifo: str, log: str, cache_mb: int, message: str) -> None:
    with pytest.raises(LazyFSError, match=message):
        config_toml(Path(fifo), Path(log), cache_mb)


@pytest.mark.parametrize(("log", "count"), [
    ("", 0),
    ("[info] [lazyfs.faults.worker]: waiting for fault commands...\n", 0),
    ("[warning] [lazyfs.cmds]: clear cache request submitted...\n", 0),
    ("[warning] [lazyfs.cmds]: clear cache request submitted...\n[warning] [lazyfs.cmds]: cache is cleared.\n", 1),
    ("x: cache is cleared.\ny\nz: cache is cleared.", 2),
])
def test_cleared_count(log: str, count: int) -> None:
    assert cleared_count(log) == count


@pytest.mark.parametrize(("log", "totals"), [
    ("", []),
    ("[warning] [lazyfs.cmds]: report request submitted...\n[warning] [lazyfs.cmds]: report generated.\n", []),
    ("[info] [lazyfs.cmds]: report: all data blocks are synced!\n", [0]),
    ("[info] [lazyfs.cmds]: report: [inode 7] info: (block 0) to (block 1) [byte index 0 to index 5099]\n"
     "[info] [lazyfs.cmds]: report: total number of bytes un-fsynced: 5110 bytes.\n\n"
     "[info] [lazyfs.cmds]: report: all data blocks are synced!\n"
     "[info] [lazyfs.cmds]: report: total number of bytes un-fsynced: 12 bytes.\n", [5110, 0, 12]),
])
def test_unsynced_reports(log: str, totals: list[int]) -> None:
    assert unsynced_reports(log) == totals


MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
98 22 0:45 / /tmp/run\\0401/n1/mnt rw,nosuid,nodev,relatime shared:50 - fuse.lazyfs lazyfs rw,user_id=0
99 22 0:46 / /tmp/back\\134slash rw - fuse.lazyfs lazyfs rw
100 22 0:47 / /tmp/not\\99octal rw - tmpfs tmpfs rw
"""


def test_lazyfs_mount_points_are_the_fuse_lazyfs_ones() -> None:
    assert lazyfs_mount_points(MOUNTINFO) == ["/tmp/run 1/n1/mnt", "/tmp/back\\slash"]
    assert lazyfs_mount_points("") == []


def test_mounted_paths_unescapes_the_kernels_octal() -> None:
    assert mounted_paths(MOUNTINFO) == {"/", "/tmp/run 1/n1/mnt", "/tmp/back\\slash", "/tmp/not\\99octal"}
    assert mounted_paths("") == set()
    assert mounted_paths("short line\n") == set()


@pytest.mark.parametrize(("target", "pick", "size", "expected"), [
    ("all", 7, 3, ["n1", "n2", "n3"]),
    ("all", 7, 5, ["n1", "n2", "n3", "n4", "n5"]),
])
def test_power_all_takes_every_node(target: str, pick: int, size: int, expected: list[str]) -> None:
    assert power_victims(target, [f"n{i}" for i in range(1, size + 1)], pick) == expected


@pytest.mark.parametrize("size", [3, 5])
def test_power_majority_is_a_seeded_majority(size: int) -> None:
    ids = [f"n{i}" for i in range(1, size + 1)]
    seen = set()
    for pick in range(40):
        victims = power_victims("majority", ids, pick)
        assert len(victims) == size // 2 + 1 and len(set(victims)) == len(victims) and set(victims) <= set(ids)
        assert victims == sorted(victims)
        assert power_victims("majority", ids, pick) == victims  # a function of the pick
        seen.add(tuple(victims))
    assert len(seen) > 1  # not always the same nodes


def test_power_victims_refuses_unknown_targets() -> None:
    with pytest.raises(ValueError, match="unknown power target"):
        power_victims("leader", ["n1", "n2", "n3"], 1)


def test_power_cuts_alternate_all_then_majority() -> None:
    faults = plan(5, ["power"], 60.0)
    assert len(faults) >= 4
    assert [f.target for f in faults] == [("all", "majority")[i % 2] for i in range(len(faults))]
    mixed = [f for f in plan(5, ["power", "kill", "pause"], 120.0) if f.kind == "power"]
    assert [f.target for f in mixed] == [("all", "majority")[i % 2] for i in range(len(mixed))]


def test_all_nemeses_leave_power_out() -> None:
    # "all" keeps meaning what it meant (old seeds replay the same schedules); power needs LazyFS and asks for it.
    assert "power" in KINDS and "power" not in ALL_KINDS
    assert set(ALL_KINDS) | {"power"} == set(KINDS)


def test_disks_hold_the_data_and_the_logs_stay_off_them(tmp_path: Path) -> None:
    topology = local_topology(tmp_path / "cluster", 3, spares=1)
    disks = NodeDisks(tmp_path / "cluster" / "disks", ["n1", "n2", "n3", "n4"], BIN)
    on_disks = disks.attach(topology)
    for before, after in zip([*topology.nodes, *topology.spares], [*on_disks.nodes, *on_disks.spares], strict=True):
        base = tmp_path.resolve() / "cluster" / "disks" / before.node_id
        assert after.data_dir == str(base / "mnt" / "data")
        assert after.log_file == str(Path(before.data_dir) / "node.log")
        assert (after.disk_fifo, after.disk_log) == (str(base / "faults.fifo"), str(base / "lazyfs.log"))
        assert (after.api, after.raft, after.http) == (before.api, before.raft, before.http)
    # The session on the netns target reads its topology from JSON: the disks go with it.
    assert Topology.from_json(json.loads(json.dumps(on_disks.to_json()))) == on_disks
    with pytest.raises(ValueError, match="no disk for node n4"):
        NodeDisks(tmp_path / "d", ["n1", "n2", "n3"], BIN).attach(topology)
