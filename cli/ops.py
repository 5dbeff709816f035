"""``regctl snapshot ...``: online backup and offline restore."""

from __future__ import annotations

from pathlib import Path

import click

from registry.backup import decode_backup, seed_data_dir, write_atomic
from registry.errors import BadRequest, Internal

from .main import Ctx, cli, handles_errors
from .output import emit


@cli.group()
def snapshot() -> None:
    """Save a consistent backup of a running cluster; restore one into fresh data dirs."""


@snapshot.command("save")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.pass_obj
@handles_errors
def snapshot_save(obj: Ctx, file: Path) -> None:
    """Write a backup of the cluster's state (linearizable, online) to FILE."""
    chunks: list[bytes] = []
    done: dict[str, int] | None = None
    with obj.client() as client:
        for item in client.stream("snapshot_save", {}):
            if item.get("type") == "chunk":
                chunks.append(bytes(item["data"]))
            elif item.get("type") == "done":
                done = item
    if done is None:
        raise Internal("the node ended the backup stream without finishing it")
    data = b"".join(chunks)
    if len(data) != done["bytes"]:
        raise Internal(f"backup truncated: got {len(data)} of {done['bytes']} bytes")
    decode_backup(data, source="received backup")  # verify before writing
    write_atomic(file, data)
    emit(obj.output, {"file": str(file), "revision": done["revision"], "bytes": len(data)},
         f"saved backup at revision {done['revision']} to {file} ({len(data)} bytes)")


@snapshot.command("restore")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Fresh data dir of a node (or, with --nodes, the data dir of `regctl up`).")
@click.option("--nodes", type=int, default=None,
              help="Seed DATA_DIR/n1..nN, the layout `regctl up --nodes N --data-dir DATA_DIR` uses.")
@click.pass_obj
@handles_errors
def snapshot_restore(obj: Ctx, file: Path, data_dir: Path, nodes: int | None) -> None:
    """Seed fresh data dir(s) from backup FILE; start the nodes on them afterwards.

    Seed every member of the new cluster from the same file. A corrupt or
    foreign file, or a data dir that already holds cluster data, is refused
    and nothing is written.
    """
    data = file.read_bytes()
    decode_backup(data, source=str(file))
    dirs = [data_dir] if nodes is None else [data_dir / f"n{i}" for i in range(1, nodes + 1)]
    busy = [d for d in dirs if d.exists() and any((d / n).exists() for n in
                                                  ("raft.journal", "raft.snapshot", "seed.snapshot"))]
    if busy:
        raise BadRequest(f"refusing to restore: {', '.join(map(str, busy))} already hold cluster data")
    meta: dict[str, object] = {}
    for d in dirs:
        meta = seed_data_dir(data, d)
    emit(obj.output, {"revision": meta.get("revision"), "data_dirs": [str(d) for d in dirs]},
         f"restored revision {meta.get('revision')} into {', '.join(map(str, dirs))}")
