"""The one table of ops: every op's name, how it is served, and the permission it needs.

Every set of ops anywhere in the node is derived from ``OP_TABLE``: the
commands the state machine applies (checked against the command schemas and
the state's handlers at import), the ops a client may propose as they are,
the ACL checks, the audit of ACL changes, the metrics' op labels.  Adding an
op is one entry here plus its schema (state-machine commands) or its handler
(node requests).

The permission is a replicated rule: the state machine authorizes commands
with it at apply time, so it lives here, in the pure layer, and must stay
deterministic.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

__all__ = [
    "OpSpec",
    "OP_TABLE",
    "Served",
    "COMMAND_OPS",
    "CLIENT_COMMAND_OPS",
    "WRITE_OPS",
    "ANONYMOUS_OPS",
    "FILTERED_OPS",
    "AUDITED_OPS",
    "NO_BARRIER_OPS",
    "SELF_CHECKED_OPS",
    "REQUEST_OPS",
    "op_permission",
]

#: How a request reaches the state machine, if it does:
#: ``write``: the client's args are a state-machine command, proposed as they are (the hot writes);
#: ``acl_write``: likewise, for ACL and intention changes (audited);
#: ``handler``: a node handler serves it (reads, keepalives, login; it may propose commands itself);
#: ``stream``: a node handler that answers with a stream (watch, snapshot);
#: ``internal``: a state-machine command only nodes propose; clients can never send it.
Served = Literal["write", "acl_write", "handler", "stream", "internal"]

#: (verb, resource) an op needs; a resource of None means any valid token (the result is filtered).
Permission = tuple[str, str | None]
_Rule = Callable[[Mapping[str, Any]], Permission | None]


@dataclass(frozen=True, slots=True)
class OpSpec:
    name: str
    served: Served
    #: What the op needs with ACLs on, from its args (or the command); None: anyone.
    permission: _Rule
    #: Also a state-machine command (it has a schema and a state handler), whoever proposes it.
    command: bool = False
    #: Its success is written to the audit log (ACL and intention changes).
    audited: bool = False
    #: Authorized against local state without a read barrier (hot, checked by the leader anyway).
    no_barrier: bool = False
    #: A node handler that proposes a command with the caller's ``auth`` stamped, so the state
    #: machine authorizes it at apply; the edge check only spares an unprivileged caller the work.
    self_checked: bool = False


def _arg(args: Mapping[str, Any], name: str) -> str:
    value = args.get(name)
    return value if isinstance(value, str) else ""


def _anyone(args: Mapping[str, Any]) -> Permission | None:
    return None


def _on(verb: str, kind: str, field: str) -> _Rule:
    """``verb`` on ``kind:<args[field]>``."""

    def rule(args: Mapping[str, Any]) -> Permission | None:
        return verb, f"{kind}:{_arg(args, field)}"

    return rule


def _fixed(verb: str, resource: str | None) -> _Rule:
    def rule(args: Mapping[str, Any]) -> Permission | None:
        return verb, resource

    return rule


def _watch(args: Mapping[str, Any]) -> Permission | None:
    # A watch on one service needs read on it; wider watches are filtered event by event.
    if isinstance(args.get("service"), str):
        return "read", "service:" + _arg(args, "service")
    return "read", None


_ADMIN_CLUSTER = _fixed("admin", "cluster")
_ADMIN_ACL = _fixed("admin", "acl")


def _table(*specs: OpSpec) -> dict[str, OpSpec]:
    table: dict[str, OpSpec] = {}
    for spec in specs:
        assert spec.name not in table, f"op {spec.name} listed twice"
        assert spec.command or spec.served not in ("write", "acl_write", "internal"), spec.name
        table[spec.name] = spec
    return table


OP_TABLE: Final[dict[str, OpSpec]] = _table(
    # -- the registry: client writes are commands as they are ------------------------------------
    OpSpec("register", "write", _on("register", "service", "service"), command=True),
    OpSpec("deregister", "write", _on("register", "service", "service"), command=True),
    OpSpec("set_status", "write", _on("register", "service", "service"), command=True),
    OpSpec("service_put", "write", _on("write", "service", "name"), command=True),
    OpSpec("service_delete", "write", _on("write", "service", "name"), command=True),
    OpSpec("key_put", "write", _on("write", "key", "key"), command=True),
    OpSpec("key_delete", "write", _on("write", "key", "key"), command=True),
    OpSpec("lock_acquire", "write", _on("write", "key", "name"), command=True),
    OpSpec("lock_release", "write", _on("write", "key", "name"), command=True),
    OpSpec("lease_grant", "write", _fixed("write", "lease"), command=True),
    OpSpec("lease_revoke", "write", _fixed("write", "lease"), command=True),
    # -- reads ------------------------------------------------------------------------------------
    OpSpec("status", "handler", _anyone),
    OpSpec("service_get", "handler", _on("read", "service", "name")),
    OpSpec("instance_get", "handler", _on("read", "service", "service")),
    OpSpec("service_list", "handler", _fixed("read", None)),
    OpSpec("service_dump", "handler", _fixed("read", None)),
    OpSpec("key_get", "handler", _on("read", "key", "key")),
    OpSpec("key_list", "handler", _fixed("read", None)),
    OpSpec("lock_get", "handler", _on("read", "key", "name")),
    OpSpec("lease_get", "handler", _fixed("read", "lease")),
    OpSpec("lease_list", "handler", _fixed("read", "lease")),
    OpSpec("lease_ttl", "handler", _fixed("read", "lease")),
    OpSpec("watch", "stream", _watch),
    # -- leases: keepalives are leader-local, never a Raft entry ----------------------------------
    OpSpec("lease_keepalive", "handler", _fixed("write", "lease"), no_barrier=True),
    OpSpec("lease_keepalive_batch", "handler", _fixed("write", "lease"), no_barrier=True),
    # -- ACLs and intentions ----------------------------------------------------------------------
    OpSpec("acl_bootstrap", "handler", _anyone, command=True, audited=True),
    OpSpec("login", "handler", _anyone),
    OpSpec("acl_token_create", "handler", _ADMIN_ACL, command=True, audited=True, self_checked=True),
    OpSpec("acl_token_delete", "acl_write", _ADMIN_ACL, command=True, audited=True),
    OpSpec("acl_token_list", "handler", _ADMIN_ACL),
    OpSpec("acl_role_put", "acl_write", _ADMIN_ACL, command=True, audited=True),
    OpSpec("acl_role_delete", "acl_write", _ADMIN_ACL, command=True, audited=True),
    OpSpec("acl_role_list", "handler", _ADMIN_ACL),
    OpSpec("acl_user_put", "handler", _ADMIN_ACL, command=True, audited=True, self_checked=True),
    OpSpec("acl_user_delete", "acl_write", _ADMIN_ACL, command=True, audited=True),
    OpSpec("acl_user_list", "handler", _ADMIN_ACL),
    OpSpec("intention_put", "acl_write", _fixed("write", "intention"), command=True, audited=True),
    OpSpec("intention_delete", "acl_write", _fixed("write", "intention"), command=True, audited=True),
    OpSpec("intention_default_set", "acl_write", _fixed("write", "intention"), command=True, audited=True),
    OpSpec("intention_list", "handler", _fixed("read", "intention")),
    OpSpec("intention_check", "handler", _fixed("read", "intention")),
    # -- the cluster ------------------------------------------------------------------------------
    OpSpec("member_list", "handler", _fixed("read", "cluster")),
    OpSpec("member_add", "handler", _ADMIN_CLUSTER),
    OpSpec("member_remove", "handler", _ADMIN_CLUSTER),
    OpSpec("member_transfer_leader", "handler", _ADMIN_CLUSTER),
    OpSpec("snapshot_save", "stream", _ADMIN_CLUSTER),
    # -- commands only nodes propose --------------------------------------------------------------
    OpSpec("barrier", "internal", _ADMIN_CLUSTER, command=True),
    OpSpec("lease_expire", "internal", _ADMIN_CLUSTER, command=True),
    OpSpec("leader_epoch", "internal", _ADMIN_CLUSTER, command=True),
    OpSpec("identity_put", "internal", _ADMIN_CLUSTER, command=True),
    OpSpec("identity_delete", "internal", _ADMIN_CLUSTER, command=True),
)


def _where(test: Callable[[OpSpec], bool]) -> frozenset[str]:
    return frozenset(name for name, spec in OP_TABLE.items() if test(spec))


#: Every op the state machine applies (the command schemas and the state's handlers must match).
COMMAND_OPS: Final = _where(lambda s: s.command)
#: The hot client writes: args are a command.  A node checks every field of their args by
#: exact type (``registry.fsm.commands`` schemas) before anything else reads them, which the
#: data-model walk of the frame codec would only repeat: the node skips the walk for these
#: args (``ServerConnection(checked_ops=)``), so a value outside the model there is a
#: BAD_REQUEST answer to that request, not a broken connection.  Clients still walk what
#: they send, and the node's decoder refuses non-string map keys outright.
WRITE_OPS: Final = _where(lambda s: s.served == "write")
#: Every op whose client args are a command as they are: authorized by the state machine at apply.
CLIENT_COMMAND_OPS: Final = _where(lambda s: s.served in ("write", "acl_write"))
#: Ops a client may send (everything but internal commands).
REQUEST_OPS: Final = _where(lambda s: s.served != "internal")
ANONYMOUS_OPS: Final = _where(lambda s: s.permission({}) is None)
#: Ops that need only a valid token: their result is filtered per item.
FILTERED_OPS: Final = _where(lambda s: s.permission({}) == ("read", None))
AUDITED_OPS: Final = _where(lambda s: s.audited)
NO_BARRIER_OPS: Final = _where(lambda s: s.no_barrier)
SELF_CHECKED_OPS: Final = _where(lambda s: s.self_checked)


def op_permission(op: str, args: Mapping[str, Any]) -> Permission | None:
    """What ``op`` with ``args`` (or a command) needs: (verb, resource); None = anyone.

    A resource of None means "any valid token" (the result is filtered per
    item).  Unknown ops need admin on cluster (default deny).
    """
    spec = OP_TABLE.get(op)
    if spec is None:
        return "admin", "cluster"
    return spec.permission(args)
