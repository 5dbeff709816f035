"""``regctl lease ...``, ``regctl lock``, ``regctl elect``: leases and coordination."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import click

from registry.client import SyncClient
from registry.errors import NotFound, RegistryError

from .base import EXIT_REFUSED, Ctx, cli, fail, handles_errors
from .durations import LeaseTtl
from .output import emit, table

#: `lease list` asks the leader for the remaining time of at most this many leases (one request each).
LEASE_LIST_REMAINING_MAX = 200


@cli.group()
def lease() -> None:
    """Grant, keep alive, revoke and list leases."""


@lease.command("grant")
@click.argument("ttl", type=LeaseTtl())
@click.pass_obj
@handles_errors
def lease_grant(obj: Ctx, ttl: int) -> None:
    """Grant a lease of TTL (e.g. 10s); prints its id."""
    with obj.client() as client:
        lease_id = client.lease_grant(ttl)
    emit(obj.output, {"lease": lease_id, "ttl_ms": ttl}, f"lease {lease_id} granted, ttl {ttl / 1000:g}s")


class Stopper:
    """Turns SIGINT/SIGTERM into a flag the foreground loops poll."""

    def __init__(self) -> None:
        self.stopped = False
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGTERM, self._stop)

    def _stop(self, signum: int, frame: object) -> None:
        self.stopped = True

    def sleep(self, seconds: float, while_running: Callable[[], bool] = lambda: True) -> None:
        """Sleep up to ``seconds``; return early when stopped or when ``while_running()`` turns false."""
        end = time.monotonic() + seconds
        while not self.stopped and time.monotonic() < end and while_running():
            time.sleep(min(0.05, max(0.0, end - time.monotonic())))


def keep_alive(client: SyncClient, lease_id: int, ttl_ms: int, stopper: Stopper,
               while_running: Callable[[], bool] = lambda: True) -> RegistryError | None:
    """Renew every third of the TTL until stopped; return the error that ended it, if any."""
    interval_s = max(0.1, ttl_ms / 3000.0)
    # One attempt must not outlast the renewal interval: a hung leader (paused,
    # partitioned) would otherwise hold the whole client timeout while the new
    # leader's countdown runs out.  A timed-out attempt moves to the next node.
    attempt_s = max(0.5, interval_s)
    while not stopper.stopped and while_running():
        try:
            client.call("lease_keepalive", {"lease": lease_id}, timeout_s=attempt_s)
        except RegistryError as err:
            if not err.retryable:  # NOT_FOUND (lost), or a refusal no retry can change
                return err
            # Unavailable for longer than one attempt: the lease may still live
            # (a new leader restarts its countdown); retry at once elsewhere.
            click.echo(f"warning: keepalive failed: {err.code}: {err.message}", err=True)
            stopper.sleep(0.05, while_running)
            continue
        # Wake as soon as the command exits, not a third of the TTL later.
        stopper.sleep(interval_s, while_running)
    return None


def keep_alive_many(client: SyncClient, lease_ids: list[int], ttl_ms: int, stopper: Stopper) -> list[int]:
    """Renew all of ``lease_ids`` with one request each third of the shortest TTL; return the lost ones."""
    interval_s = max(0.1, ttl_ms / 3000.0)
    attempt_s = max(0.5, interval_s)  # as in keep_alive: never wait out a hung leader
    while not stopper.stopped:
        try:
            missing = client.lease_keepalive_many(lease_ids, timeout_s=attempt_s)["missing"]
        except RegistryError as err:
            if not err.retryable:
                raise
            click.echo(f"warning: keepalive failed: {err.code}: {err.message}", err=True)
            stopper.sleep(0.05)
            continue
        if missing:
            return [int(lease) for lease in missing]
        stopper.sleep(interval_s)
    return []


@lease.command("keepalive")
@click.argument("lease_ids", type=int, nargs=-1, required=True)
@click.pass_obj
@handles_errors
def lease_keepalive(obj: Ctx, lease_ids: tuple[int, ...]) -> None:
    """Keep LEASE_ID... alive in the foreground until Ctrl-C (exit 1 if a lease is lost).

    Several leases are renewed together, one request per round (lease_keepalive_batch).
    """
    stopper = Stopper()
    with obj.client() as client:
        if len(lease_ids) == 1:
            (lease_id,) = lease_ids
            ttl = client.lease_keepalive(lease_id)
            click.echo(f"keeping lease {lease_id} alive (ttl {ttl / 1000:g}s); Ctrl-C to stop", err=True)
            err = keep_alive(client, lease_id, ttl, stopper)
            if err is not None:
                fail(err)
            return
        ids = list(lease_ids)
        first = client.lease_keepalive_many(ids)
        lost = first["missing"]
        if not lost:
            ttl = min(first["ttl_ms"])
            click.echo(f"keeping {len(ids)} leases alive (shortest ttl {ttl / 1000:g}s); Ctrl-C to stop", err=True)
            lost = keep_alive_many(client, ids, ttl, stopper)
    if lost:
        fail(NotFound(f"lease(s) {', '.join(map(str, lost))} not found (expired or revoked)"))


@lease.command("revoke")
@click.argument("lease_id", type=int)
@click.pass_obj
@handles_errors
def lease_revoke(obj: Ctx, lease_id: int) -> None:
    """Revoke LEASE_ID; everything attached to it goes in one revision."""
    with obj.client() as client:
        result = client.lease_revoke(lease_id)
    emit(obj.output, {"lease": lease_id, **result},
         f"lease {lease_id} revoked at revision {result['revision']} "
         f"({result.get('instances', 0)} instance(s), {result.get('keys', 0)} key(s), "
         f"{result.get('locks', 0)} lock(s))")


@lease.command("list")
@click.pass_obj
@handles_errors
def lease_list(obj: Ctx) -> None:
    """Every live lease."""
    with obj.client() as client:
        revision, leases = client.lease_list()
        # The countdown lives on the leader (keepalives are leader-local): ask it per lease, as
        # etcd's `lease timetolive` does, for a bounded number of leases.
        for item in leases[:LEASE_LIST_REMAINING_MAX]:
            try:
                _, ttl = client.lease_ttl(item["lease"])
                item["remaining_ms"] = ttl["remaining_ms"]
            except NotFound:
                item["remaining_ms"] = 0  # expired or revoked since the listing
    rows = [[item["lease"], item["ttl_ms"] / 1000,
             f"{item['remaining_ms'] / 1000:.1f}" if "remaining_ms" in item else "",
             item.get("instances", 0), item.get("keys", 0), item.get("locks", 0)]
            for item in leases]
    more = len(leases) - LEASE_LIST_REMAINING_MAX
    emit(obj.output, {"revision": revision, "leases": leases},
         table(rows, ["LEASE", "TTL_S", "REMAINING_S", "INSTANCES", "KEYS", "LOCKS"]) + f"\nrevision: {revision}"
         + (f"\nREMAINING_S shown for the first {LEASE_LIST_REMAINING_MAX}; `regctl lease ttl ID` for the other "
            f"{more}" if more > 0 else ""))


@lease.command("ttl")
@click.argument("lease_id", type=int)
@click.pass_obj
@handles_errors
def lease_ttl(obj: Ctx, lease_id: int) -> None:
    """Time left on LEASE_ID, and what is attached to it."""
    with obj.client() as client:
        revision, body = client.lease_ttl(lease_id)
    emit(obj.output, {"revision": revision, **body},
         f"lease {lease_id}: {body['remaining_ms'] / 1000:.1f}s of {body['ttl_ms'] / 1000:g}s left")


def _lock_holder(client: SyncClient, name: str) -> tuple[str, int] | None:
    """Who holds lock ``name`` and since which revision, or None (released meanwhile)."""
    try:
        _, record = client.lock_get(name)
    except NotFound:
        return None
    return str(record.get("holder") or ""), int(record["create_revision"])


def _hold_lock(obj: Ctx, name: str, ttl: int, holder: str, wait: bool,
               run: Callable[[SyncClient, int, int, Stopper], int]) -> None:
    stopper = Stopper()
    with obj.client() as client:
        lease_id = client.lease_grant(ttl)
        try:
            token = None
            #: The (holder, since revision) last announced on stderr while waiting.
            announced: tuple[str, int] | None = None
            while not stopper.stopped:
                try:
                    _, body = client.lock_acquire(name, lease_id, holder)
                    token = int(body["token"])
                    break
                except RegistryError as err:
                    if err.code != "CONFLICT" or not wait:
                        raise
                holder_now = _lock_holder(client, name)
                if holder_now is not None and holder_now != announced:
                    announced = holder_now
                    click.echo(f"waiting for {holder_now[0] or 'another holder'} (since revision {holder_now[1]})…",
                               err=True)
                # Waiting for the holder: keep our own lease alive meanwhile.
                client.lease_keepalive(lease_id)
                stopper.sleep(0.2)
            if token is None:
                return
            code = run(client, lease_id, token, stopper)
        finally:
            try:
                client.lease_revoke(lease_id)
            except RegistryError:
                pass
    sys.exit(code)


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--ttl", type=LeaseTtl(), default="10s", show_default=True, help="Lease TTL of the lock.")
@click.option("--no-wait", is_flag=True, help="Fail at once (exit 1) if the lock is held.")
@click.pass_obj
@handles_errors
def lock(obj: Ctx, name: str, command: tuple[str, ...], ttl: int, no_wait: bool) -> None:
    """Run COMMAND while holding lock NAME; stop it if the lock is lost.

    The fencing token is in $REGCTL_LOCK_TOKEN. Exit code: the command's, or 1
    if the lock was lost (the command was terminated).
    """

    def run(client: SyncClient, lease_id: int, token: int, stopper: Stopper) -> int:
        click.echo(f"lock {name} acquired, fencing token {token}", err=True)
        env = {**os.environ, "REGCTL_LOCK_TOKEN": str(token), "REGCTL_LOCK_LEASE": str(lease_id)}
        proc = subprocess.Popen(list(command), env=env)
        lost = keep_alive(client, lease_id, ttl, stopper, lambda: proc.poll() is None)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if lost is not None:
                click.echo(f"error: lock {name} lost ({lost.message}); command terminated", err=True)
                return EXIT_REFUSED
            return 130 if stopper.stopped else int(proc.returncode or 0)
        return int(proc.returncode)

    _hold_lock(obj, name, ttl, " ".join(command)[:128], not no_wait, run)


@cli.command()
@click.argument("name")
@click.option("--value", default="", help="What to announce as leader (e.g. this host's address).")
@click.option("--ttl", type=LeaseTtl(), default="10s", show_default=True)
@click.pass_obj
@handles_errors
def elect(obj: Ctx, name: str, value: str, ttl: int) -> None:
    """Campaign for leadership of NAME; hold it until Ctrl-C or until it is lost."""

    def run(client: SyncClient, lease_id: int, token: int, stopper: Stopper) -> int:
        emit(obj.output, {"elected": name, "value": value, "token": token, "lease": lease_id},
             f"elected leader of {name} (token {token}); Ctrl-C to resign")
        lost = keep_alive(client, lease_id, ttl, stopper)
        if lost is not None:
            click.echo(f"error: leadership of {name} lost: {lost.message}", err=True)
            return EXIT_REFUSED
        return 0

    _hold_lock(obj, f"election/{name}", ttl, value or "candidate", True, run)


@cli.command()
@click.argument("name", required=False)
@click.option("--prefix", default=None, help="Watch every service (and key) whose name starts with this.")
@click.option("--all", "watch_all", is_flag=True, help="Watch everything, leases and locks too.")
@click.option("--from-revision", type=int, default=None, help="Start at this revision (default: now).")
@click.option("--list", "list_first", is_flag=True, help="First print the current state, then the changes.")
@click.pass_obj
@handles_errors
def watch(obj: Ctx, name: str | None, prefix: str | None, watch_all: bool, from_revision: int | None,
          list_first: bool) -> None:
    """Print changes to service NAME (or --prefix P, or --all) until Ctrl-C. JSON lines with -o json."""
    import json

    if (name is not None) + (prefix is not None) + watch_all != 1:
        raise click.UsageError("give exactly one of NAME, --prefix or --all")
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with obj.client() as client:
        try:
            for item in client.watch(service=name, prefix=prefix, all=watch_all, start_revision=from_revision,
                                     list_first=list_first):
                kind = item.get("type")
                if obj.output == "json":
                    items = item["events"] if kind == "events" else [item]
                    for one in items:
                        click.echo(json.dumps(one, sort_keys=True, default=str))
                    continue
                if kind == "events":
                    for ev in item["events"]:
                        after = ev.get("after") or ev.get("before") or {}
                        what = f"{ev.get('service') or ''}/{ev.get('id') or ''}".strip("/")
                        detail = ""
                        if ev["kind"] == "instance" and after:
                            detail = f" {after.get('address')}:{after.get('port')} {after.get('status')}"
                        if ev.get("note"):
                            detail += f" note: {ev['note']}"
                        click.echo(f"{ev['revision']:>8}  {ev['type']:<6} {ev['kind']:<8} {what}{detail}")
                elif kind == "snapshot":
                    click.echo(f"-- snapshot at revision {item['revision']} ({item['reason']}): "
                               f"{len(item['services'])} service(s)")
                    for svc in item["services"]:
                        for inst in svc["instances"]:
                            click.echo(f"{item['revision']:>8}  exists {'instance':<8} {svc['service']['name']}/"
                                       f"{inst['id']} {inst['address']}:{inst['port']} {inst['status']}")
                    if item.get("reason") == "list":
                        # The listing came first; the changes follow it (announced only now: causal order).
                        sys.stdout.flush()
                        click.echo(f"-- watching from revision {item['revision'] + 1}", err=True)
                elif kind == "created" and not list_first:
                    # With --list the node announces the watch before sending the listing, whose
                    # revision it is based on: the line waits for the snapshot (above).
                    click.echo(f"-- watching from revision {item['revision'] + 1}", err=True)
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass
