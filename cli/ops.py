"""``regctl snapshot ...``: online backup and offline restore."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from registry.client import SyncClient
from registry.errors import BadRequest, Internal, NotLeader, RegistryError
from registry.server.backup import decode_backup, seed_data_dir, write_atomic

from .base import Ctx, cli, handles_errors
from .output import emit, printable, table


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


@cli.group()
def member() -> None:
    """List, add and remove cluster members; transfer leadership. Members are named by Raft HOST:PORT."""


@member.command("list")
@click.pass_obj
@handles_errors
def member_list(obj: Ctx) -> None:
    """Every member as the leader sees it (node id, connected, how far its log matches)."""
    with obj.client() as client:
        # Only the leader knows how far each log matches (and every peer's API): find it first.
        statuses = client.cluster_status()
        leader_api = next((str(s["api"]) for s in statuses if s.get("reachable") and s.get("role") == "leader"),
                          None) or next((str(s["leader_api"]) for s in statuses
                                         if s.get("reachable") and s.get("leader_api")), None)
        body: dict[str, Any] | None = None
        if leader_api is not None:
            with SyncClient([leader_api], token=obj.token, timeout_s=obj.timeout_s,
                            ssl_context=obj.ssl_context()) as leader_client:
                try:
                    _, body = leader_client.member_list()
                except RegistryError:
                    body = None
        if body is None or not any(m["self"] and m["leader"] for m in body["members"]):
            click.echo("note: the leader did not answer; this is a follower's view (no match indexes)", err=True)
            _, body = client.member_list()
        assert body is not None  # either the leader's answer or the fallback's
        # Node ids (n1, ...) from each member's own status, asked on its API.
        apis = [str(m["api"]) for m in body["members"] if m.get("api")]
        ids: dict[str, str] = {}
        if apis:
            # These addresses are read from the cluster (keys clients can write): status needs no token,
            # so none is sent there.
            with SyncClient(apis, token=None, timeout_s=obj.timeout_s,
                            ssl_context=obj.ssl_context()) as members_client:
                for s in members_client.cluster_status():
                    if s.get("reachable") and s.get("raft"):
                        ids[str(s["raft"])] = str(s.get("id"))
    for m in body["members"]:
        m["id"] = ids.get(str(m["raft"]))
    rows = [[m["id"] or "?", m["raft"], m.get("api") or "", "leader" if m["leader"] else "follower",
             "yes" if m["connected"] else "no", m.get("match_index") if m.get("match_index") is not None else ""]
            for m in body["members"]]
    emit(obj.output, body, table(rows, ["ID", "RAFT", "API", "ROLE", "CONNECTED", "MATCH_INDEX"]))


def _change_membership(obj: Ctx, change: Callable[[SyncClient], tuple[int, Any]]) -> int:
    """Send a membership change to the leader, which alone makes them (a follower answers NOT_LEADER).

    Never retried on its own: a change whose outcome is unknown must not be sent twice.
    """
    with obj.client() as client:
        try:
            revision, _ = change(client)  # never retried (the typed member calls send retry=False)
            return int(revision)
        except NotLeader as err:
            if not err.hint:
                raise
            hint = err.hint
    if hint not in obj.endpoints:
        # The hint is read from the cluster (--peer-api, or keys under _cluster/ that clients can
        # write): the token is never sent to an address it names, only to the ones given here.
        shown = printable(hint)  # read from the cluster: it could hold anything, terminal escapes included
        raise click.ClickException(f"the leader's API is {shown}, which is not among --endpoints; if you trust "
                                   f"that address, run again with --endpoints {shown}")
    with SyncClient([hint], token=obj.token, timeout_s=obj.timeout_s, ssl_context=obj.ssl_context()) as leader_client:
        revision, _ = change(leader_client)
        return int(revision)


@member.command("add")
@click.argument("raft")
@click.option("--api", default=None, help="The new member's API HOST:PORT (for leader hints and listings).")
@click.pass_obj
@handles_errors
def member_add(obj: Ctx, raft: str, api: str | None) -> None:
    """Add the node at Raft address RAFT (start it first, with --peers listing the current members).

    With --api, the new node's data-directory identity is read from it and
    recorded before it becomes a member, so no one else can ever vote under
    its address; without, the leader records it on first contact.
    """
    args = {"raft": raft}
    if api:
        args["api"] = api
        with obj.client() as client:
            try:
                status = client.node_status(api)
            except (RegistryError, OSError) as err:
                raise click.ClickException(f"cannot reach the new member's API at {api} ({err}); start it first, "
                                           "with --peers listing the current members") from None
        if status.get("raft") != raft:
            raise click.ClickException(f"the node at {api} has Raft address {status.get('raft')}, not {raft}")
        if status.get("incarnation"):
            args["incarnation"] = str(status["incarnation"])
    else:
        click.echo(f"note: without --api, {raft}'s data-directory identity is recorded when it first talks to "
                   "the leader, not before it becomes a member (see README, Day-two operations)", err=True)
    revision = _change_membership(obj, lambda c: c.member_add(raft, args.get("api"), args.get("incarnation")))
    emit(obj.output, {"added": raft, "revision": revision}, f"added member {raft}")


@member.command("remove")
@click.argument("raft")
@click.pass_obj
@handles_errors
def member_remove(obj: Ctx, raft: str) -> None:
    """Remove the member at Raft address RAFT."""
    revision = _change_membership(obj, lambda c: c.member_remove(raft))
    emit(obj.output, {"removed": raft, "revision": revision}, f"removed member {raft}")


@member.command("transfer-leader")
@click.argument("raft", required=False)
@click.pass_obj
@handles_errors
def member_transfer_leader(obj: Ctx, raft: str | None) -> None:
    """Ask the leader to hand leadership to RAFT (default: the most caught-up follower)."""
    import time

    with obj.client() as client:
        _, before = client.member_list()
        client.member_transfer_leader(raft or None)
        # pysyncobj only promises the request was sent: confirm the outcome.
        deadline = time.monotonic() + 5.0
        leader = before.get("leader")
        while time.monotonic() < deadline:
            try:
                _, now = client.member_list()
                leader = now.get("leader")
            except RegistryError:
                leader = None
            if leader and leader != before.get("leader") and (raft is None or leader == raft):
                break
            time.sleep(0.1)
    moved = leader is not None and leader != before.get("leader") and (raft is None or leader == raft)
    emit(obj.output, {"requested": raft, "leader": leader, "transferred": moved},
         f"leader is now {leader}" if moved else f"transfer did not complete; leader is {leader}")
    if not moved:
        sys.exit(1)


@cli.command()
@click.option("--interval", type=float, default=1.0, show_default=True, help="Seconds between refreshes.")
@click.option("--count", type=int, default=0, help="Stop after this many refreshes (0: until Ctrl-C).")
@click.pass_obj
@handles_errors
def top(obj: Ctx, interval: float, count: int) -> None:
    """A live view of the cluster: nodes, roles, indexes, lag, revision, request rates, leases, watchers."""
    import time

    previous: dict[str, tuple[float, int]] = {}
    shown = 0
    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
    with obj.client() as client:
        try:
            while count == 0 or shown < count:
                started = time.monotonic()
                nodes = client.cluster_status()
                commit_max = max((n.get("commit_index") or 0 for n in nodes if n.get("reachable")), default=0)
                rows = []
                for n in nodes:
                    if not n.get("reachable"):
                        rows.append([n.get("api"), "unreachable", "", "", "", "", "", "", "", ""])
                        continue
                    key = str(n["api"])
                    total = int(n.get("requests_total", 0))
                    rate = ""
                    if key in previous:
                        then, before = previous[key]
                        rate = f"{(total - before) / max(1e-6, started - then):.0f}"
                    previous[key] = (started, total)
                    rows.append([n["id"], n["role"], n["term"], n["commit_index"], n["applied_index"],
                                 commit_max - int(n["applied_index"]), n["revision"], rate,
                                 n.get("leases", ""), n.get("watchers", "")])
                text = table(rows, ["NODE", "ROLE", "TERM", "COMMIT", "APPLIED", "LAG", "REVISION", "REQ/S",
                                    "LEASES", "WATCHERS"])
                if obj.output == "json":
                    emit(obj.output, nodes, "")
                else:
                    click.echo(clear + time.strftime("%H:%M:%S ") + "regctl top\n" + text)
                shown += 1
                time.sleep(max(0.0, interval - (time.monotonic() - started)))
        except KeyboardInterrupt:
            pass
