"""Command schemas and ``validate_command``: untrusted dict -> normalised command.

A command is a map with an ``"op"`` key naming the operation plus that op's
fields.  Every op additionally accepts ``"rid"`` (client request id, for
de-duplication) and ``"now_ms"`` (wall clock stamped by the proposer; the
state machine never reads a clock itself).

``validate_command`` is pure and total: for any input it returns a *new* dict
or raises a ``BadRequest`` subclass.  The returned dict

* has exactly the keys ``op``, ``rid``, ``now_ms`` and every field of the op's
  schema, defaults filled in (``rid``/``now_ms`` are ``None`` when absent);
* shares no mutable object with the input (meta maps and tag lists are
  rebuilt), so the state machine may store its parts without copying;
* is canonical (meta sorted by key, duplicate tags and lease ids dropped) and
  is a fixed point: ``validate_command(validate_command(c)) == validate_command(c)``.

Errors, checked in this order so the first problem is reported:
unknown field -> ``BadRequest`` naming it; missing required field or wrong
Python type -> ``BadRequest`` naming the field and the expected type; bad
value -> ``InvalidName`` / ``InvalidArgument`` from :mod:`registry.fsm.model`.
An optional field given as ``None`` (msgpack nil) takes its default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

from registry.errors import BadRequest, UnknownOp
from registry.fsm import acl, model, ops

__all__ = ["FieldSpec", "SCHEMAS", "OPS", "is_normalised", "validate_command"]

Kind = Literal["str", "int", "int?", "map<str,str>", "list<str>", "list<int>"]


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One field of a command schema."""

    kind: Kind
    #: Check (and normalise) the value once its Python type is right.
    check: Callable[[str, Any], Any]
    required: bool = False
    #: Factory for the default of an optional field (a factory, so mutable
    #: defaults are never shared between commands).
    default: Callable[[], Any] = lambda: None


def _type_error(field: str, kind: str, value: Any) -> BadRequest:
    expected = "int or nil" if kind == "int?" else kind
    return BadRequest(f"field {field!r} must be {expected}, got {type(value).__name__}")


def _coerce(field: str, kind: Kind, value: Any) -> Any:
    """Check the Python type of ``value`` and return a fresh, exact-typed copy.

    bool is rejected where int is expected: it is an int subclass in Python but
    never a meaningful port, TTL or revision.  Subclasses of str/int are
    converted to the exact type so they pack like any other value.
    """
    if kind == "str":
        if isinstance(value, str):
            return value if type(value) is str else str.__str__(value)
    elif kind == "int" or kind == "int?":
        if isinstance(value, int) and not isinstance(value, bool):
            return value if type(value) is int else int(value)
        if value is None and kind == "int?":
            return None
    elif kind == "map<str,str>":
        if isinstance(value, dict):
            out: dict[str, str] = {}
            for k, v in value.items():
                if not isinstance(k, str) or not isinstance(v, str):
                    raise _type_error(field, kind, value)
                out[str.__str__(k)] = str.__str__(v)
            return out
    elif kind == "list<str>":
        if isinstance(value, list | tuple):
            if not all(isinstance(x, str) for x in value):
                raise _type_error(field, kind, value)
            return [str.__str__(x) for x in value]
    elif kind == "list<int>":
        if isinstance(value, list | tuple):
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
                raise _type_error(field, kind, value)
            return [int(x) for x in value]
    raise _type_error(field, kind, value)


def _f(kind: Kind, check: Callable[[str, Any], Any], default: Callable[[], Any] | None = None) -> FieldSpec:
    """Optional field (``default`` omitted means default ``None``)."""
    return FieldSpec(kind, check, required=False, default=default or (lambda: None))


def _r(kind: Kind, check: Callable[[str, Any], Any]) -> FieldSpec:
    """Required field."""
    return FieldSpec(kind, check, required=True)


# Fields every op accepts.
_COMMON: Final[dict[str, FieldSpec]] = {
    "rid": _f("str", model.check_rid),
    "now_ms": _f("int?", model.check_now_ms),
    # sha256 of the caller's token, stamped by the receiving node when ACLs are on:
    # the state machine then authorizes the command at apply time (see registry.fsm.acl).
    "auth": _f("str", acl.check_hash),
}
_ACL_ID = _r("str", acl.check_id)
_ROLES = _f("list<str>", acl.check_roles, list)

_META = _f("map<str,str>", model.check_meta, dict)
_TAGS = _f("list<str>", model.check_tags, list)
_LEASE_OPT = _f("int?", model.check_optional_lease_id)
_GUARD = _f("int?", model.check_guard)

#: op -> field -> spec (without the common fields).
_OP_FIELDS: Final[dict[str, dict[str, FieldSpec]]] = {
    "service_put": {"name": _r("str", model.check_name), "meta": _META, "tags": _TAGS},
    "service_delete": {"name": _r("str", model.check_name)},
    "register": {
        "service": _r("str", model.check_name),
        "id": _r("str", model.check_name),
        "address": _r("str", model.check_address),
        "port": _r("int", model.check_port),
        "meta": _META,
        "tags": _TAGS,
        "weight": _f("int", model.check_weight, lambda: model.WEIGHT_DEFAULT),
        "status": _f("str", model.check_status, lambda: model.STATUS_DEFAULT),
        "lease": _LEASE_OPT,
        "if_mod_revision": _GUARD,
    },
    "deregister": {"service": _r("str", model.check_name), "id": _r("str", model.check_name)},
    "set_status": {
        "service": _r("str", model.check_name),
        "id": _r("str", model.check_name),
        "status": _r("str", model.check_status),
        "note": _f("str", model.check_note, str),
    },
    # now_ms is required here: it becomes the lease's granted_ms.
    "lease_grant": {"ttl_ms": _r("int", model.check_ttl_ms), "now_ms": _r("int", model.check_now_ms)},
    "lease_revoke": {"lease": _r("int", model.check_lease_id)},
    "lease_expire": {
        "leases": _r("list<int>", model.check_lease_list),
        "epoch": _r("int", model.check_epoch),
    },
    # state_bytes_max: the announcing leader's --max-state-bytes, which every replica then enforces.
    "leader_epoch": {"epoch": _r("int", model.check_epoch),
                     "state_bytes_max": _f("int?", model.check_optional_state_bytes_max)},
    # Member identities (registry.raft.incarnation): proposed by nodes only, never by clients (not in WRITE_OPS).
    "identity_put": {
        "raft": _r("str", model.check_key),
        "incarnation": _r("str", model.check_incarnation),
        "mode": _r("str", model.check_identity_mode),
    },
    "identity_delete": {"raft": _r("str", model.check_key)},
    "key_put": {
        "key": _r("str", model.check_key),
        "value": _r("str", model.check_value),
        "lease": _LEASE_OPT,
        "if_mod_revision": _GUARD,
    },
    "key_delete": {"key": _r("str", model.check_key), "if_mod_revision": _GUARD},
    "lock_acquire": {
        "name": _r("str", model.check_key),
        "lease": _r("int", model.check_lease_id),
        "holder": _f("str", model.check_holder, str),
    },
    "lock_release": {"name": _r("str", model.check_key), "lease": _r("int", model.check_lease_id)},
    "barrier": {},
    "acl_bootstrap": {"token_id": _ACL_ID, "secret_hash": _r("str", acl.check_hash)},
    "acl_token_create": {
        "token_id": _ACL_ID,
        "secret_hash": _r("str", acl.check_hash),
        "roles": _ROLES,
        "description": _f("str", acl.check_description, str),
        "expires_ms": _f("int?", acl.check_expires),
        # Set by the node for login tokens only: each user holds at most LOGIN_TOKENS_PER_USER_MAX.
        "login": _f("str", acl.check_login, str),
    },
    "acl_token_delete": {"token_id": _ACL_ID},
    "acl_role_put": {"name": _ACL_ID, "rules": _f("list<str>", acl.check_rules, list)},
    "acl_role_delete": {"name": _ACL_ID},
    "acl_user_put": {"name": _ACL_ID, "password_hash": _r("str", acl.check_password_hash), "roles": _ROLES},
    "acl_user_delete": {"name": _ACL_ID},
    "intention_put": {
        "source": _r("str", model.check_name),
        "destination": _r("str", model.check_name),
        "action": _r("str", acl.check_action),
    },
    "intention_delete": {"source": _r("str", model.check_name), "destination": _r("str", model.check_name)},
    "intention_default_set": {"action": _r("str", acl.check_action)},
}

#: op -> complete schema, common fields included (op-specific specs win).
SCHEMAS: Final[dict[str, dict[str, FieldSpec]]] = {
    op: {**_COMMON, **fields} for op, fields in _OP_FIELDS.items()
}

#: Every op the state machine serves.
OPS: Final = frozenset(SCHEMAS)
assert OPS == ops.COMMAND_OPS, f"schemas and the op table disagree: {sorted(OPS ^ ops.COMMAND_OPS)}"


#: Exact Python type of each kind: a value of exactly this type (with, for
#: containers, items of exactly str/int) needs no coercion, only its check.
_EXACT: Final[dict[str, type]] = {
    "str": str, "int": int, "int?": int, "map<str,str>": dict, "list<str>": list, "list<int>": list,
}

#: op -> (allowed field names, flattened field specs): the hot path of every
#: write, so attribute lookups are hoisted out of the per-command loop.
_CompiledField = tuple[str, Kind, Callable[[str, Any], Any], bool, Callable[[], Any], type]
_COMPILED: Final[dict[str, tuple[frozenset[str], tuple[_CompiledField, ...]]]] = {
    op: (
        frozenset(schema) | {"op"},
        tuple((name, f.kind, f.check, f.required, f.default, _EXACT[f.kind]) for name, f in schema.items()),
    )
    for op, schema in SCHEMAS.items()
}


def _quote(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 64 else text[:61] + "..."


def _exact_items(kind: Kind, value: Any) -> bool:
    """Whether a dict/list already holds exactly-typed items (then no coercing copy is needed)."""
    if kind == "map<str,str>":
        for k, v in value.items():
            if type(k) is not str or type(v) is not str:
                return False
        return True
    want = str if kind == "list<str>" else int
    for x in value:
        if type(x) is not want:
            return False
    return True


def validate_command(cmd: Any) -> dict[str, Any]:
    """Check ``cmd`` against its op's schema; return a new, normalised dict or raise."""
    if not isinstance(cmd, dict):
        raise BadRequest(f"command must be a map, got {type(cmd).__name__}")
    if "op" not in cmd:
        raise BadRequest("missing field 'op'")
    op = cmd["op"]
    if not isinstance(op, str):
        raise _type_error("op", "str", op)
    compiled = _COMPILED.get(op)
    if compiled is None:
        raise UnknownOp(f"unknown op {_quote(op)}")
    allowed, fields = compiled
    if not allowed.issuperset(cmd):
        # Name the first offending field in the command's own order.
        unknown = next(name for name in cmd if name not in allowed)
        raise BadRequest(f"unknown field {_quote(unknown)} for op {op!r}")
    out: dict[str, Any] = {"op": op}
    for name, kind, check, required, default, exact in fields:
        value = cmd.get(name)
        if value is None:
            if required:
                raise BadRequest(f"missing field {name!r} ({kind}) for op {op!r}")
            out[name] = default()
            continue
        # Fast path: exact types (what msgpack decodes to) are only checked,
        # never copied.  Scalars are immutable; every container check
        # (check_meta, check_tags, ...) returns a new container, and the
        # identity test below keeps the no-aliasing promise even if one did not.
        if type(value) is not exact:
            value = _coerce(name, kind, value)
        elif exact is dict or exact is list:
            if not _exact_items(kind, value):
                value = _coerce(name, kind, value)
            checked = check(name, value)
            if checked is value:
                checked = dict(value) if exact is dict else list(value)
            out[name] = checked
            continue
        out[name] = check(name, value)
    return out


#: op -> (normalised key count, (field, exact type, may be None, kind if a container else None)):
#: what ``is_normalised`` checks.  A field may be None after validation only
#: if it is optional and its default is None.
_SHAPES: Final[dict[str, tuple[int, tuple[tuple[str, type, bool, Kind | None], ...]]]] = {
    op: (
        len(schema) + 1,
        tuple(
            (name, _EXACT[f.kind], not f.required and f.default() is None,
             f.kind if _EXACT[f.kind] in (dict, list) else None)
            for name, f in schema.items()
        ),
    )
    for op, schema in SCHEMAS.items()
}


def is_normalised(cmd: dict[str, Any]) -> bool:
    """Cheap structural test: could ``cmd`` be an output of ``validate_command``?

    True when ``cmd`` names a known op and has exactly that op's normalised
    key set, every value of its field's exact Python type (None only where
    validation leaves None), container items of exact types too.  Values are
    *not* range- or pattern-checked: this is the guard the state machine runs
    on commands that came through the Raft log, which every proposer
    validated before proposing (see ``RegistryState.apply``).  A command
    failing it gets full validation instead, so nothing depends on it for
    safety against malformed input -- only on proposers validating.
    """
    op = cmd.get("op")
    shape = _SHAPES.get(op) if type(op) is str else None
    if shape is None:
        return False
    size, fields = shape
    if len(cmd) != size:
        return False
    try:
        for name, exact, nullable, container in fields:
            value = cmd[name]
            if type(value) is not exact:
                if value is None and nullable:
                    continue
                return False
            if container is not None and not _exact_items(container, value):
                return False
    except KeyError:  # a key of another op in place of one of ours (the count matched)
        return False
    return True
