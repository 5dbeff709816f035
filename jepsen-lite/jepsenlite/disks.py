"""Disks that can lose power: one LazyFS mount per node, for the ``power`` nemesis.

Each node gets a disk of its own, as real machines have.  One shared mount
would not do: ``clear-cache`` drops the unsynced bytes of every file on a
mount, so cutting the power of two nodes would also take, from under the
third and still running node, bytes it wrote and was about to fsync.  Its
fsync would then report success for data that is gone, and the run would
blame the registry for what the test did.

A node's data directory is ``<root>/<node>/mnt/data`` (on its disk); its
log stays where the runner keeps it (``cluster/<node>/node.log``, not on the
disk, so that a power cut does not eat the lines that explain it).  The
disks are mounted by the runner's own process before the session and
unmounted after it, whatever happened; the session, which may run in
another process (the netns target's client namespace), only sends
``clear-cache`` through each disk's FIFO (``lazyfs.clear_cache``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .lazyfs import CACHE_MB_DEFAULT, LazyFSMount
from .runner import NodeSpec, Topology

__all__ = ["NodeDisks"]


class NodeDisks:
    """The LazyFS mounts of one run, one per node id; ``unmount_all`` is idempotent."""

    def __init__(self, root: Path, node_ids: list[str], binary: Path, *, cache_mb: int = CACHE_MB_DEFAULT) -> None:
        self.root = root
        self.mounts = {nid: LazyFSMount(root / nid, binary, cache_mb=cache_mb) for nid in node_ids}

    def mount_all(self) -> None:
        """Mount every disk; if one fails, unmount the others and raise (``LazyFSError``)."""
        try:
            for mount in self.mounts.values():
                mount.mount()
        except BaseException:
            self.unmount_all()
            raise

    def data_dir(self, node_id: str) -> Path:
        return self.mounts[node_id].mnt / "data"

    def attach(self, topology: Topology) -> Topology:
        """The same topology with every node's data on its disk and its log where its data used to be."""

        def on_disk(spec: NodeSpec) -> NodeSpec:
            if spec.node_id not in self.mounts:
                raise ValueError(f"no disk for node {spec.node_id}")
            mount = self.mounts[spec.node_id]
            return dataclasses.replace(spec, data_dir=str(self.data_dir(spec.node_id)),
                                       log_file=str(Path(spec.data_dir) / "node.log"),
                                       disk_fifo=str(mount.fifo), disk_log=str(mount.log))

        return dataclasses.replace(topology, nodes=tuple(on_disk(s) for s in topology.nodes),
                                   spares=tuple(on_disk(s) for s in topology.spares))

    def unmount_all(self) -> list[str]:
        """Unmount every disk (nodes must be stopped first); return the problems, if any."""
        problems: list[str] = []
        for mount in self.mounts.values():
            problems += mount.unmount()
        return problems
