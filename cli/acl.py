"""``regctl acl ...``, ``regctl login`` and ``regctl intention ...``."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from registry.client import SyncClient
from registry.errors import RegistryError

from .base import Ctx, cli, fail, handles_errors
from .durations import Duration
from .output import emit, table


def _read_password(prompt: str, from_stdin: bool) -> str:
    """The password from stdin (one line) when piped or asked to, else a hidden prompt."""
    if from_stdin or not sys.stdin.isatty():
        line = sys.stdin.readline()
        password = line.rstrip("\r\n")
    else:
        password = click.prompt(prompt, hide_input=True)
    if not password:
        raise click.UsageError("empty password")
    return password


@cli.group()
def acl() -> None:
    """ACL tokens, roles and users (servers started with --acl enforce them)."""


@acl.command("bootstrap")
@click.pass_obj
@handles_errors
def acl_bootstrap(obj: Ctx) -> None:
    """Issue the first management token (once per cluster)."""
    with obj.client() as client:
        _, body = client.acl_bootstrap()
    emit(obj.output, body,
         f"management token id: {body['id']}\nsecret: {body['secret']}\n"
         "This is the only time this management token is shown; store it now.")


@acl.group("token")
def token() -> None:
    """Create, list and revoke tokens."""


@token.command("create")
@click.option("--role", "roles", multiple=True, required=True, help="Role to bind (repeatable).")
@click.option("--description", default="", help="Free text shown by `acl token list`.")
@click.option("--ttl", type=Duration(), default=None, help="Expire after this long (e.g. 24h); default never.")
@click.pass_obj
@handles_errors
def token_create(obj: Ctx, roles: tuple[str, ...], description: str, ttl: int | None) -> None:
    """Create a token bound to roles; prints its secret once."""
    with obj.client() as client:
        _, body = client.acl_token_create(roles, description=description, ttl_ms=ttl)
    emit(obj.output, body, f"token id: {body['id']}\nsecret: {body['secret']}\n"
                           "This is the only time this token's secret is shown; store it now.")


@token.command("list")
@click.pass_obj
@handles_errors
def token_list(obj: Ctx) -> None:
    """List tokens (never their secrets)."""
    _listing(obj, SyncClient.acl_token_list, ("ID", "ROLES", "EXPIRES_MS", "DESCRIPTION"),
             lambda t: (t["id"], ",".join(t["roles"]), t["expires_ms"] or "never", t["description"]))


@token.command("revoke")
@click.argument("token_id")
@click.pass_obj
@handles_errors
def token_revoke(obj: Ctx, token_id: str) -> None:
    """Revoke a token: its next request on any node fails and its watch streams end."""
    _change(obj, lambda c: c.acl_token_delete(token_id), {"id": token_id}, f"revoked token {token_id}")


def _change(obj: Ctx, op: Callable[[SyncClient], tuple[int, Any]], shown: dict[str, Any], done: str) -> None:
    """Run a mutating op; print ``done`` with the revision it took (JSON: ``shown`` plus ``revision``)."""
    with obj.client() as client:
        revision, _ = op(client)
    emit(obj.output, {**shown, "revision": revision}, f"{done} at revision {revision}")


def _listing(obj: Ctx, op: Callable[[SyncClient], tuple[int, Any]], headers: tuple[str, ...],
             row: Callable[[dict[str, Any]], tuple[Any, ...]]) -> None:
    """Run a list op; a table of one ``row`` per item (JSON: the items as the node sent them)."""
    with obj.client() as client:
        _, body = op(client)
    emit(obj.output, body, table([row(item) for item in body], headers))


@acl.group("role")
def role() -> None:
    """Roles: named sets of rules."""


@role.command("create")
@click.argument("name")
@click.option("--rule", "rules", multiple=True,
              help="RESOURCE=VERB[,VERB] with RESOURCE service:GLOB, key:PREFIX, lease, acl, cluster, intention "
                   "or *, and VERB read, write, register, admin (repeatable).")
@click.pass_obj
@handles_errors
def role_create(obj: Ctx, name: str, rules: tuple[str, ...]) -> None:
    """Create or replace role NAME."""
    _change(obj, lambda c: c.acl_role_put(name, rules), {"name": name}, f"role {name} saved")


@role.command("list")
@click.pass_obj
@handles_errors
def role_list(obj: Ctx) -> None:
    """List roles and their rules."""
    _listing(obj, SyncClient.acl_role_list, ("NAME", "RULES"),
             lambda r: (r["name"], " ".join(f"{x['resource']}={','.join(x['verbs'])}" for x in r["rules"])))


@role.command("delete")
@click.argument("name")
@click.pass_obj
@handles_errors
def role_delete(obj: Ctx, name: str) -> None:
    """Delete role NAME (tokens bound to it lose its rules)."""
    _change(obj, lambda c: c.acl_role_delete(name), {"name": name}, f"role {name} deleted")


@acl.group("user")
def user() -> None:
    """Users: people who log in with a password."""


@user.command("create")
@click.argument("name")
@click.option("--role", "roles", multiple=True, help="Role to bind (repeatable).")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin.")
@click.pass_obj
@handles_errors
def user_create(obj: Ctx, name: str, roles: tuple[str, ...], password_stdin: bool) -> None:
    """Create or replace user NAME (the node stores a salted scrypt hash of the password)."""
    password = _read_password("password", password_stdin)
    _change(obj, lambda c: c.acl_user_put(name, password, roles), {"name": name},
            f"user {name} saved")


@user.command("list")
@click.pass_obj
@handles_errors
def user_list(obj: Ctx) -> None:
    """List users and their roles."""
    _listing(obj, SyncClient.acl_user_list, ("NAME", "ROLES"), lambda u: (u["name"], ",".join(u["roles"])))


@user.command("delete")
@click.argument("name")
@click.pass_obj
@handles_errors
def user_delete(obj: Ctx, name: str) -> None:
    """Delete user NAME."""
    _change(obj, lambda c: c.acl_user_delete(name), {"name": name}, f"user {name} deleted")


@cli.command()
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin.")
@click.pass_obj
def login(obj: Ctx, name: str, password_stdin: bool) -> None:
    """Exchange user NAME's password for a token (valid 24h); prints the token's secret."""
    password = _read_password("password", password_stdin)
    try:
        with obj.client() as client:
            _, body = client.login(name, password)
    except RegistryError as err:
        fail(err)
        return
    emit(obj.output, body, f"token id: {body['id']}\nsecret: {body['secret']}\n"
                           "Use it with --token or REGCTL_TOKEN; it expires in 24 hours.")


@cli.group()
def intention() -> None:
    """Service-to-service intentions: may SRC connect to DST?"""


def _put_intention(obj: Ctx, source: str, destination: str, action: str) -> None:
    with obj.client() as client:
        revision, _ = client.intention_put(source, destination, action)
    emit(obj.output, {"source": source, "destination": destination, "action": action, "revision": revision},
         f"{action} {source} -> {destination} at revision {revision}")


@intention.command("allow")
@click.argument("source")
@click.argument("destination")
@click.pass_obj
@handles_errors
def intention_allow(obj: Ctx, source: str, destination: str) -> None:
    """Allow SOURCE to connect to DESTINATION."""
    _put_intention(obj, source, destination, "allow")


@intention.command("deny")
@click.argument("source")
@click.argument("destination")
@click.pass_obj
@handles_errors
def intention_deny(obj: Ctx, source: str, destination: str) -> None:
    """Deny SOURCE connections to DESTINATION."""
    _put_intention(obj, source, destination, "deny")


@intention.command("check")
@click.argument("source")
@click.argument("destination")
@click.pass_obj
@handles_errors
def intention_check(obj: Ctx, source: str, destination: str) -> None:
    """Say whether SOURCE may connect to DESTINATION (exit 1 if denied)."""
    with obj.client() as client:
        _, body = client.intention_check(source, destination)
    why = f"intention {body['matched']}" if body["matched"] else "the default"
    emit(obj.output, body, f"{body['action']}: {source} -> {destination} ({why})")
    if body["action"] != "allow":
        sys.exit(1)


@intention.command("list")
@click.pass_obj
@handles_errors
def intention_list(obj: Ctx) -> None:
    """List intentions and the default action."""
    with obj.client() as client:
        _, body = client.intention_list()
    rows = [(i["source"], i["destination"], i["action"]) for i in body["intentions"]]
    emit(obj.output, body, table(rows, ("SOURCE", "DESTINATION", "ACTION")) + f"\ndefault: {body['default']}")


@intention.command("delete")
@click.argument("source")
@click.argument("destination")
@click.pass_obj
@handles_errors
def intention_delete(obj: Ctx, source: str, destination: str) -> None:
    """Delete the intention SOURCE -> DESTINATION (the default applies again)."""
    with obj.client() as client:
        revision, _ = client.intention_delete(source, destination)
    emit(obj.output, {"source": source, "destination": destination, "revision": revision},
         f"deleted {source} -> {destination} at revision {revision}")


@intention.command("default")
@click.argument("action", type=click.Choice(["allow", "deny"]))
@click.pass_obj
@handles_errors
def intention_default(obj: Ctx, action: str) -> None:
    """Set the action for pairs without an intention."""
    with obj.client() as client:
        revision, _ = client.intention_default_set(action)
    emit(obj.output, {"default": action, "revision": revision}, f"default {action} at revision {revision}")
