"""Table-driven tests of the registry state machine (registry/fsm/state.py)."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from typing import Any

import msgpack
import pytest

from registry.errors import (
    BadRequest,
    Conflict,
    InvalidArgument,
    InvalidName,
    LimitExceeded,
    NotFound,
    RegistryError,
    UnknownOp,
)
from registry.fsm import model
from registry.fsm.commands import OPS, validate_command
from registry.fsm.limits import StateLimits
from registry.fsm.state import Applied, RegistryState

Cmd = dict[str, Any]


def state_with(*commands: Cmd) -> RegistryState:
    st = RegistryState()
    for cmd in commands:
        st.apply(cmd)
    return st


def reg(svc: str = "web", iid: str = "w1", **kw: Any) -> Cmd:
    return {"op": "register", "service": svc, "id": iid, "address": "10.0.0.1", "port": 80, **kw}


GRANT: Cmd = {"op": "lease_grant", "ttl_ms": 5000, "now_ms": 1000}

# A small populated world used by many rows: service "web" (rev 1, implicit)
# with w1 (rev 1, no lease), lease 1 (rev 2), w2 on lease 1 (rev 3),
# key "cfg/a" on lease 1 (rev 4), key "plain" (rev 5), lock "leader" on lease 1 (rev 6).
WORLD: tuple[Cmd, ...] = (
    reg("web", "w1"),
    GRANT,
    reg("web", "w2", lease=1),
    {"op": "key_put", "key": "cfg/a", "value": "x", "lease": 1},
    {"op": "key_put", "key": "plain", "value": "y"},
    {"op": "lock_acquire", "name": "leader", "lease": 1, "holder": "node-a"},
)
WORLD_REV = 6


def ev_summary(events: list[dict[str, Any]]) -> list[tuple[str, str, str | None, str | None]]:
    return [(e["type"], e["kind"], e["service"], e["id"]) for e in events]


# ---------------------------------------------------------------------------
# Successful commands: (id, setup, command, result subset, events, revision delta)
# ---------------------------------------------------------------------------

OK_CASES: list[tuple[str, tuple[Cmd, ...], Cmd, dict[str, Any], list[tuple[Any, ...]], int]] = [
    (
        "service_put create",
        (),
        {"op": "service_put", "name": "api", "meta": {"b": "2", "a": "1"}, "tags": ["x", "y", "x"]},
        {"created": True},
        [("put", "service", "api", None)],
        1,
    ),
    (
        "service_put replace",
        WORLD,
        {"op": "service_put", "name": "web", "tags": ["blue"]},
        {"created": False},
        [("put", "service", "web", None)],
        1,
    ),
    (
        "service_delete deletes instances first, sorted, one revision",
        WORLD,
        {"op": "service_delete", "name": "web"},
        {"instances": 2},
        [
            ("delete", "instance", "web", "w1"),
            ("delete", "instance", "web", "w2"),
            ("delete", "service", "web", None),
        ],
        1,
    ),
    (
        "register creates service implicitly",
        (),
        reg("db", "d1"),
        {"created": True},
        [("put", "service", "db", None), ("put", "instance", "db", "d1")],
        1,
    ),
    (
        "register into existing service",
        WORLD,
        reg("web", "w3"),
        {"created": True},
        [("put", "instance", "web", "w3")],
        1,
    ),
    (
        "register replaces",
        WORLD,
        reg("web", "w1", port=81),
        {"created": False},
        [("put", "instance", "web", "w1")],
        1,
    ),
    (
        "register guard 0 on absent",
        WORLD,
        reg("web", "new", if_mod_revision=0),
        {"created": True},
        [("put", "instance", "web", "new")],
        1,
    ),
    (
        "register guard matches",
        WORLD,
        reg("web", "w2", if_mod_revision=3),
        {"created": False},
        [("put", "instance", "web", "w2")],
        1,
    ),
    (
        "deregister",
        WORLD,
        {"op": "deregister", "service": "web", "id": "w2"},
        {},
        [("delete", "instance", "web", "w2")],
        1,
    ),
    (
        "set_status change",
        WORLD,
        {"op": "set_status", "service": "web", "id": "w1", "status": "critical", "note": "down"},
        {"changed": True},
        [("status", "instance", "web", "w1")],
        1,
    ),
    (
        "set_status unchanged: no bump",
        WORLD,
        {"op": "set_status", "service": "web", "id": "w1", "status": "passing"},
        {"changed": False},
        [],
        0,
    ),
    ("lease_grant", WORLD, GRANT, {"lease": 2, "ttl_ms": 5000}, [("put", "lease", None, "2")], 1),
    (
        "lease_revoke removes attachments in one revision",
        WORLD,
        {"op": "lease_revoke", "lease": 1},
        {"instances": 1, "keys": 1, "locks": 1},
        [
            ("delete", "instance", "web", "w2"),
            ("delete", "key", None, "cfg/a"),
            ("delete", "lock", None, "leader"),
            ("delete", "lease", None, "1"),
        ],
        1,
    ),
    (
        "lease_expire",
        WORLD,
        {"op": "lease_expire", "leases": [1, 99], "epoch": 3},
        {"dropped": False, "expired": [1]},
        [
            ("expire", "instance", "web", "w2"),
            ("expire", "key", None, "cfg/a"),
            ("expire", "lock", None, "leader"),
            ("expire", "lease", None, "1"),
        ],
        1,
    ),
    (
        "lease_expire nothing live: no bump",
        WORLD,
        {"op": "lease_expire", "leases": [42], "epoch": 0},
        {"dropped": False, "expired": []},
        [],
        0,
    ),
    ("leader_epoch", WORLD, {"op": "leader_epoch", "epoch": 7}, {"epoch": 7}, [], 0),
    ("identity_put", WORLD, {"op": "identity_put", "raft": "10.0.0.1:7101", "incarnation": "a" * 32,
                             "mode": "create"}, {}, [], 0),
    ("identity_delete", WORLD, {"op": "identity_delete", "raft": "10.0.0.1:7101"}, {"deleted": False}, [], 0),
    (
        "key_put create",
        WORLD,
        {"op": "key_put", "key": "k", "value": ""},
        {"created": True},
        [("put", "key", None, "k")],
        1,
    ),
    (
        "key_put replace with guard",
        WORLD,
        {"op": "key_put", "key": "plain", "value": "z", "if_mod_revision": 5},
        {"created": False},
        [("put", "key", None, "plain")],
        1,
    ),
    (
        "key_put moves onto lease",
        WORLD,
        {"op": "key_put", "key": "plain", "value": "z", "lease": 1},
        {"created": False},
        [("put", "key", None, "plain")],
        1,
    ),
    ("key_delete", WORLD, {"op": "key_delete", "key": "plain"}, {}, [("delete", "key", None, "plain")], 1),
    (
        "key_delete guarded",
        WORLD,
        {"op": "key_delete", "key": "plain", "if_mod_revision": 5},
        {},
        [("delete", "key", None, "plain")],
        1,
    ),
    (
        "lock_acquire free",
        WORLD,
        {"op": "lock_acquire", "name": "jobs/x", "lease": 1},
        {"token": WORLD_REV + 1, "acquired": True},
        [("put", "lock", None, "jobs/x")],
        1,
    ),
    (
        "lock_acquire same lease: idempotent",
        WORLD,
        {"op": "lock_acquire", "name": "leader", "lease": 1, "holder": "other text"},
        {"token": 6, "acquired": False},
        [],
        0,
    ),
    (
        "lock_release",
        WORLD,
        {"op": "lock_release", "name": "leader", "lease": 1},
        {},
        [("delete", "lock", None, "leader")],
        1,
    ),
    ("barrier", WORLD, {"op": "barrier"}, {}, [], 0),
    # ACL ops (their detailed cases are in test_acl.py).
    ("acl_bootstrap", WORLD, {"op": "acl_bootstrap", "token_id": "t0", "secret_hash": "a" * 64},
     {"id": "t0"}, [("put", "acl_token", None, "t0")], 1),
    ("acl_token_create", WORLD,
     {"op": "acl_token_create", "token_id": "t1", "secret_hash": "b" * 64, "roles": ["management"]},
     {"id": "t1"}, [("put", "acl_token", None, "t1")], 1),
    ("acl_token_delete", (*WORLD, {"op": "acl_bootstrap", "token_id": "t0", "secret_hash": "a" * 64}),
     {"op": "acl_token_delete", "token_id": "t0"}, {}, [("delete", "acl_token", None, "t0")], 1),
    ("acl_role_put", WORLD, {"op": "acl_role_put", "name": "ro", "rules": ["service:*=read"]},
     {"created": True}, [("put", "acl_role", None, "ro")], 1),
    ("acl_role_delete", (*WORLD, {"op": "acl_role_put", "name": "ro", "rules": []}),
     {"op": "acl_role_delete", "name": "ro"}, {}, [("delete", "acl_role", None, "ro")], 1),
    ("acl_user_put", WORLD,
     {"op": "acl_user_put", "name": "ann", "password_hash": "scrypt$16384$8$1$" + "0" * 32 + "$" + "1" * 128},
     {"created": True}, [("put", "acl_user", None, "ann")], 1),
    ("acl_user_delete",
     (*WORLD, {"op": "acl_user_put", "name": "ann",
               "password_hash": "scrypt$16384$8$1$" + "0" * 32 + "$" + "1" * 128}),
     {"op": "acl_user_delete", "name": "ann"}, {}, [("delete", "acl_user", None, "ann")], 1),
    ("intention_put", WORLD, {"op": "intention_put", "source": "web", "destination": "db", "action": "deny"},
     {"created": True}, [("put", "intention", None, "web->db")], 1),
    ("intention_delete",
     (*WORLD, {"op": "intention_put", "source": "web", "destination": "db", "action": "deny"}),
     {"op": "intention_delete", "source": "web", "destination": "db"}, {},
     [("delete", "intention", None, "web->db")], 1),
    ("intention_default_set", WORLD, {"op": "intention_default_set", "action": "deny"},
     {"changed": True}, [("put", "intention", None, "*")], 1),
]


@pytest.mark.parametrize(
    ("setup", "cmd", "want", "events", "delta"), [c[1:] for c in OK_CASES], ids=[c[0] for c in OK_CASES]
)
def test_ok(
    setup: tuple[Cmd, ...], cmd: Cmd, want: dict[str, Any], events: list[tuple[Any, ...]], delta: int
) -> None:
    st = state_with(*setup)
    before = st.revision
    applied = st.apply(copy.deepcopy(cmd))
    assert isinstance(applied, Applied)
    assert st.revision == before + delta
    assert applied.result["revision"] == st.revision
    for key, value in want.items():
        assert applied.result[key] == value
    assert ev_summary(applied.events) == events
    assert all(e["revision"] == st.revision for e in applied.events)
    st.check_invariants()
    # Every result and event is msgpack-able.
    msgpack.packb([applied.result, applied.events])


def test_every_op_has_an_ok_case() -> None:
    assert {c[2]["op"] for c in OK_CASES} == set(OPS)


# ---------------------------------------------------------------------------
# Failing commands: (id, setup, command, error class, message fragment)
# ---------------------------------------------------------------------------

FAIL_CASES: list[tuple[str, tuple[Cmd, ...], Any, type[RegistryError], str]] = [
    ("not a map", (), ["op"], BadRequest, "must be a map"),
    ("missing op", (), {}, BadRequest, "missing field 'op'"),
    ("op not str", (), {"op": 3}, BadRequest, "'op' must be str"),
    ("unknown op", (), {"op": "explode"}, UnknownOp, "explode"),
    ("unknown field", WORLD, {"op": "barrier", "bogus": 1}, BadRequest, "unknown field 'bogus'"),
    ("missing field", (), {"op": "register", "service": "a", "id": "b", "port": 1}, BadRequest, "'address'"),
    ("wrong type str", (), {"op": "service_put", "name": 5}, BadRequest, "field 'name' must be str, got int"),
    ("wrong type int", (), reg(port="80"), BadRequest, "field 'port' must be int, got str"),
    ("bool is not int", (), reg(port=True), BadRequest, "field 'port' must be int, got bool"),
    ("meta not map", (), reg(meta=["a"]), BadRequest, "field 'meta' must be map<str,str>"),
    ("meta value not str", (), reg(meta={"a": 1}), BadRequest, "field 'meta' must be map<str,str>"),
    ("tags not list", (), reg(tags="a"), BadRequest, "field 'tags' must be list<str>"),
    ("leases not ints", (), {"op": "lease_expire", "leases": ["1"], "epoch": 1}, BadRequest, "list<int>"),
    ("rid not str", (), {"op": "barrier", "rid": 1}, BadRequest, "field 'rid' must be str"),
    ("rid empty", (), {"op": "barrier", "rid": ""}, InvalidArgument, "rid"),
    ("rid too long", (), {"op": "barrier", "rid": "r" * 65}, InvalidArgument, "rid"),
    ("now_ms negative", (), {"op": "barrier", "now_ms": -1}, InvalidArgument, "now_ms"),
    ("grant without now_ms", (), {"op": "lease_grant", "ttl_ms": 5000}, BadRequest, "'now_ms'"),
    ("bad name", (), {"op": "service_put", "name": "-x"}, InvalidName, "name"),
    ("bad id", (), reg(iid="a b"), InvalidName, "'id'"),
    ("bad meta key", (), reg(meta={"a b": "c"}), InvalidName, "meta"),
    (
        "bad status",
        WORLD,
        {"op": "set_status", "service": "web", "id": "w1", "status": "ok"},
        InvalidArgument,
        "status",
    ),
    ("bad address", (), reg(address="a b"), InvalidArgument, "address"),
    ("port 0", (), reg(port=0), InvalidArgument, "port"),
    ("lease 0", (), reg(lease=0), InvalidArgument, "lease"),
    ("guard negative", (), reg(if_mod_revision=-1), InvalidArgument, "if_mod_revision"),
    ("epoch negative", (), {"op": "leader_epoch", "epoch": -1}, InvalidArgument, "epoch"),
    ("int too big", (), {"op": "leader_epoch", "epoch": 2**63}, InvalidArgument, "epoch"),
    ("bad key", (), {"op": "key_put", "key": "a\tb", "value": ""}, InvalidName, "key"),
    ("service_delete absent", WORLD, {"op": "service_delete", "name": "nope"}, NotFound, "nope"),
    ("register unknown lease", WORLD, reg(lease=9), NotFound, "lease 9"),
    ("register guard mismatch", WORLD, reg("web", "w1", if_mod_revision=2), Conflict, "mod_revision is 1"),
    (
        "register guard 0 but exists",
        WORLD,
        reg("web", "w1", if_mod_revision=0),
        Conflict,
        "mod_revision is 1",
    ),
    ("register guard on absent", WORLD, reg("web", "zz", if_mod_revision=4), Conflict, "mod_revision is 0"),
    (
        "deregister absent instance",
        WORLD,
        {"op": "deregister", "service": "web", "id": "zz"},
        NotFound,
        "web/zz",
    ),
    ("deregister absent service", WORLD, {"op": "deregister", "service": "x", "id": "w1"}, NotFound, "x/w1"),
    (
        "set_status absent",
        WORLD,
        {"op": "set_status", "service": "web", "id": "zz", "status": "warning"},
        NotFound,
        "",
    ),
    ("revoke absent", WORLD, {"op": "lease_revoke", "lease": 9}, NotFound, "lease 9"),
    (
        "key_put unknown lease",
        WORLD,
        {"op": "key_put", "key": "k", "value": "", "lease": 9},
        NotFound,
        "lease 9",
    ),
    (
        "key_put guard",
        WORLD,
        {"op": "key_put", "key": "plain", "value": "", "if_mod_revision": 4},
        Conflict,
        "is 5",
    ),
    (
        "key_put guard 0",
        WORLD,
        {"op": "key_put", "key": "plain", "value": "", "if_mod_revision": 0},
        Conflict,
        "is 5",
    ),
    ("key_delete absent", WORLD, {"op": "key_delete", "key": "nope"}, NotFound, "nope"),
    ("key_delete guard", WORLD, {"op": "key_delete", "key": "plain", "if_mod_revision": 1}, Conflict, "is 5"),
    (
        "lock held by other",
        (*WORLD, GRANT),
        {"op": "lock_acquire", "name": "leader", "lease": 2},
        Conflict,
        "node-a",
    ),
    ("lock unknown lease", WORLD, {"op": "lock_acquire", "name": "l", "lease": 9}, NotFound, "lease 9"),
    ("release free lock", WORLD, {"op": "lock_release", "name": "free", "lease": 1}, NotFound, "free"),
    (
        "release other's lock",
        (*WORLD, GRANT),
        {"op": "lock_release", "name": "leader", "lease": 2},
        NotFound,
        "",
    ),
]


@pytest.mark.parametrize(
    ("setup", "cmd", "exc", "fragment"), [c[1:] for c in FAIL_CASES], ids=[c[0] for c in FAIL_CASES]
)
def test_fail_changes_nothing(
    setup: tuple[Cmd, ...], cmd: Any, exc: type[RegistryError], fragment: str
) -> None:
    st = state_with(*setup)
    snap = st.snapshot()
    with pytest.raises(exc) as info:
        st.apply(cmd)
    assert type(info.value) is exc
    assert fragment in info.value.message
    assert st.snapshot() == snap


def test_conflict_message_names_lock_holder_and_token() -> None:
    st = state_with(*WORLD, GRANT)
    with pytest.raises(Conflict, match=r"'node-a' \(lease 1\) with token 6"):
        st.apply({"op": "lock_acquire", "name": "leader", "lease": 2})


# ---------------------------------------------------------------------------
# Limits, at the boundary: (id, field builder, ok value, bad value, error class)
# ---------------------------------------------------------------------------

N = model.NAME_CHARS_MAX
LIMIT_CASES: list[tuple[str, Any, Any, Any, type[BadRequest]]] = [
    ("name length", lambda v: {"op": "service_put", "name": v}, "a" * N, "a" * (N + 1), InvalidName),
    ("name empty", lambda v: {"op": "service_put", "name": v}, "a", "", InvalidName),
    ("name pattern", lambda v: {"op": "service_put", "name": v}, "a.B_9-z", "a/b", InvalidName),
    ("name leading dot", lambda v: {"op": "service_put", "name": v}, "0a", ".a", InvalidName),
    ("name trailing newline", lambda v: {"op": "service_put", "name": v}, "ab", "ab\n", InvalidName),
    ("instance id length", lambda v: reg(iid=v), "i" * N, "i" * (N + 1), InvalidName),
    ("address length", lambda v: reg(address=v), "a" * 255, "a" * 256, InvalidArgument),
    ("address empty", lambda v: reg(address=v), "a", "", InvalidArgument),
    ("address whitespace", lambda v: reg(address=v), "[::1]", "a\u00a0b", InvalidArgument),
    ("port low", lambda v: reg(port=v), 1, 0, InvalidArgument),
    ("port high", lambda v: reg(port=v), 65535, 65536, InvalidArgument),
    ("weight low", lambda v: reg(weight=v), 1, 0, InvalidArgument),
    ("weight high", lambda v: reg(weight=v), 1000, 1001, InvalidArgument),
    (
        "meta keys",
        lambda n: reg(meta={f"k{i}": "v" for i in range(n)}),
        model.META_KEYS_MAX,
        model.META_KEYS_MAX + 1,
        InvalidArgument,
    ),
    ("meta key length", lambda v: reg(meta={v: ""}), "k" * N, "k" * (N + 1), InvalidName),
    (
        "meta value length",
        lambda v: reg(meta={"k": v}),
        "v" * model.META_VALUE_CHARS_MAX,
        "v" * (model.META_VALUE_CHARS_MAX + 1),
        InvalidArgument,
    ),
    ("meta value surrogate", lambda v: reg(meta={"k": v}), "\u00e9", "\ud800", InvalidArgument),
    (
        "tags count",
        lambda n: reg(tags=[f"t{i}" for i in range(n)]),
        model.TAGS_MAX,
        model.TAGS_MAX + 1,
        InvalidArgument,
    ),
    ("tag length", lambda v: reg(tags=[v]), "t" * 512, "t" * 513, InvalidArgument),
    # Spaces and any printable character: Traefik keeps routing rules in tags.
    ("tag tab", lambda v: reg(tags=[v]), "rule=Host(`a.test`) && PathPrefix(`/b`)", "a\tb", InvalidArgument),
    ("tag newline", lambda v: reg(tags=[v]), "a b", "a\nb", InvalidArgument),
    ("tag control char", lambda v: reg(tags=[v]), "\u00e9 \u2603", "a\x07b", InvalidArgument),
    ("tag surrogate", lambda v: reg(tags=[v]), "\U0001f600", "\ud800", InvalidArgument),
    ("tag empty", lambda v: reg(tags=[v]), "t", "", InvalidArgument),
    ("ttl low", lambda v: {"op": "lease_grant", "ttl_ms": v, "now_ms": 0}, 1000, 999, InvalidArgument),
    (
        "ttl high",
        lambda v: {"op": "lease_grant", "ttl_ms": v, "now_ms": 0},
        86_400_000,
        86_400_001,
        InvalidArgument,
    ),
    ("key length", lambda v: {"op": "key_put", "key": v, "value": ""}, "k" * 512, "k" * 513, InvalidName),
    ("key empty", lambda v: {"op": "key_put", "key": v, "value": ""}, "k", "", InvalidName),
    ("key whitespace", lambda v: {"op": "key_put", "key": v, "value": ""}, "a/b", "a\nb", InvalidName),
    (
        "value bytes ascii",
        lambda v: {"op": "key_put", "key": "k", "value": v},
        "v" * model.VALUE_BYTES_MAX,
        "v" * (model.VALUE_BYTES_MAX + 1),
        InvalidArgument,
    ),
    (
        "value bytes utf-8",
        lambda v: {"op": "key_put", "key": "k", "value": v},
        "\u00e9" * (model.VALUE_BYTES_MAX // 2),
        "\u00e9" * (model.VALUE_BYTES_MAX // 2) + "a",
        InvalidArgument,
    ),
    ("value surrogate", lambda v: {"op": "key_put", "key": "k", "value": v}, "ok", "\udfff", InvalidArgument),
    (
        "holder length",
        lambda v: {"op": "lock_acquire", "name": "l", "lease": 1, "holder": v},
        "h" * 256,
        "h" * 257,
        InvalidArgument,
    ),
    (
        "note length",
        lambda v: {"op": "set_status", "service": "web", "id": "w1", "status": "warning", "note": v},
        "n" * 1024,
        "n" * 1025,
        InvalidArgument,
    ),
    (
        "rid length",
        lambda v: {"op": "key_put", "key": "k", "value": "", "rid": v},
        "r" * 64,
        "r" * 65,
        InvalidArgument,
    ),
    (
        "expire batch",
        lambda n: {"op": "lease_expire", "leases": list(range(1, n + 1)), "epoch": 0},
        model.LEASE_EXPIRE_BATCH_MAX,
        model.LEASE_EXPIRE_BATCH_MAX + 1,
        InvalidArgument,
    ),
]


@pytest.mark.parametrize(
    ("build", "ok", "bad", "exc"), [c[1:] for c in LIMIT_CASES], ids=[c[0] for c in LIMIT_CASES]
)
def test_limit_boundary(build: Any, ok: Any, bad: Any, exc: type[BadRequest]) -> None:
    st = state_with(*WORLD)
    st.apply(build(ok))
    snap = st.snapshot()
    with pytest.raises(exc) as info:
        st.apply(build(bad))
    assert type(info.value) is exc
    assert st.snapshot() == snap


CAPACITY_CASES: list[tuple[str, str, list[Cmd], Cmd, Cmd]] = [
    # (StateLimits field, fills to the limit, one more new one fails, replacing an existing one still works)
    (
        "services_max",
        "services",
        [{"op": "service_put", "name": f"s{i}"} for i in range(3)],
        reg("s9", "i"),
        {"op": "service_put", "name": "s0", "tags": ["t"]},
    ),
    (
        "instances_per_service_max",
        "instances",
        [reg("web", f"i{i}") for i in range(3)],
        reg("web", "i9"),
        reg("web", "i0", port=99),
    ),
    ("leases_max", "leases", [GRANT] * 3, GRANT, {"op": "lease_revoke", "lease": 1}),
    (
        "keys_max",
        "keys",
        [{"op": "key_put", "key": f"k{i}", "value": ""} for i in range(3)],
        {"op": "key_put", "key": "k9", "value": ""},
        {"op": "key_put", "key": "k0", "value": "new"},
    ),
]


@pytest.mark.parametrize(
    ("const", "fill", "extra", "replace"),
    [(c[0], *c[2:]) for c in CAPACITY_CASES],
    ids=[c[1] for c in CAPACITY_CASES],
)
def test_capacity_limits(const: str, fill: list[Cmd], extra: Cmd, replace: Cmd) -> None:
    # The real limits are 10^5..10^6 records; the check is the same code path
    # at any value, so shrink the limit rather than fill a million keys.
    st = RegistryState(StateLimits(**{const: 3}))
    for cmd in fill:
        st.apply(cmd)
    snap = st.snapshot()
    with pytest.raises(LimitExceeded):
        st.apply(extra)
    assert st.snapshot() == snap
    st.apply(replace)


def test_capacity_limit_constants() -> None:
    assert model.NAME_CHARS_MAX == 128
    assert model.META_KEYS_MAX == 64
    assert model.META_VALUE_CHARS_MAX == 1024
    assert (model.TAGS_MAX, model.TAG_CHARS_MAX) == (64, 512)
    assert (model.LEASE_TTL_MS_MIN, model.LEASE_TTL_MS_MAX) == (1000, 86_400_000)
    assert model.INSTANCES_PER_SERVICE_MAX == 100_000
    assert model.SERVICES_MAX == 100_000
    assert model.LEASES_MAX == 1_000_000
    assert model.KEYS_MAX == 1_000_000
    assert model.VALUE_BYTES_MAX == 64 * 1024
    assert model.DEDUP_ENTRIES_MAX == 100_000


def test_instances_per_service_real_limit() -> None:
    # One real-size boundary check: cheap enough via the internal table.
    st = RegistryState()
    st.apply(reg("big", "seed"))
    insts = st._instances["big"]
    template = insts["seed"]
    for i in range(model.INSTANCES_PER_SERVICE_MAX - 1):
        insts[f"i{i}"] = {**template, "id": f"i{i}"}
    with pytest.raises(LimitExceeded):
        st.apply(reg("big", "one-more"))
    st.apply(reg("big", "seed", port=1))  # replacing is still allowed


# ---------------------------------------------------------------------------
# Behaviour details
# ---------------------------------------------------------------------------


def test_register_keeps_create_revision_and_before() -> None:
    st = state_with(*WORLD)
    applied = st.apply(reg("web", "w1", port=81))
    (event,) = applied.events
    assert event["before"]["port"] == 80 and event["before"]["mod_revision"] == 1
    assert event["after"]["port"] == 81
    inst = st.get_instance("web", "w1")
    assert (inst["create_revision"], inst["mod_revision"]) == (1, WORLD_REV + 1)


def test_register_moves_between_leases() -> None:
    st = state_with(*WORLD, GRANT)
    st.apply(reg("web", "w2", lease=2))
    assert st.get_lease(1)["instances"] == []
    assert st.get_lease(2)["instances"] == [["web", "w2"]]
    st.apply(reg("web", "w2"))
    assert st.get_lease(2)["instances"] == []
    st.apply({"op": "lease_revoke", "lease": 2})
    assert st.get_instance("web", "w2")["lease"] is None
    st.check_invariants()


def test_service_put_replace_keeps_instances() -> None:
    st = state_with(*WORLD)
    st.apply({"op": "service_put", "name": "web", "meta": {"team": "x"}})
    svc = st.get_service("web")
    assert svc["service"]["meta"] == {"team": "x"}
    assert svc["service"]["create_revision"] == 1
    assert [i["id"] for i in svc["instances"]] == ["w1", "w2"]


def test_service_delete_detaches_leased_instances() -> None:
    st = state_with(*WORLD)
    st.apply({"op": "service_delete", "name": "web"})
    assert st.get_lease(1)["instances"] == []
    st.apply({"op": "lease_revoke", "lease": 1})
    st.check_invariants()


def test_set_status_event_carries_note() -> None:
    st = state_with(*WORLD)
    applied = st.apply(
        {"op": "set_status", "service": "web", "id": "w1", "status": "warning", "note": "slow"}
    )
    (event,) = applied.events
    assert event["note"] == "slow"
    assert (event["before"]["status"], event["after"]["status"]) == ("passing", "warning")


def test_revoke_then_everything_is_gone_in_one_revision() -> None:
    st = state_with(*WORLD)
    applied = st.apply({"op": "lease_revoke", "lease": 1})
    assert {e["revision"] for e in applied.events} == {WORLD_REV + 1}
    queries: list[tuple[Callable[..., Any], tuple[Any, ...]]] = [
        (st.get_lease, (1,)),
        (st.get_instance, ("web", "w2")),
        (st.get_key, ("cfg/a",)),
        (st.get_lock, ("leader",)),
    ]
    for query, args in queries:
        with pytest.raises(NotFound):
            query(*args)
    st.get_instance("web", "w1")
    st.get_key("plain")


def test_expire_several_leases_one_revision() -> None:
    st = state_with(*WORLD, GRANT, reg("web", "w3", lease=2), GRANT)
    applied = st.apply({"op": "lease_expire", "leases": [2, 1, 2], "epoch": 1})
    assert applied.result == {"revision": 10, "dropped": False, "expired": [1, 2]}
    assert {e["type"] for e in applied.events} == {"expire"}
    assert {e["revision"] for e in applied.events} == {10}
    assert [e["id"] for e in applied.events if e["kind"] == "lease"] == ["1", "2"]
    assert st.lease_ttls() == {3: 5000}
    assert st.epoch == 1


def test_stale_epoch_expiry_dropped() -> None:
    st = state_with(*WORLD, {"op": "leader_epoch", "epoch": 5})
    snap = st.snapshot()
    applied = st.apply({"op": "lease_expire", "leases": [1], "epoch": 4})
    assert applied == Applied({"revision": WORLD_REV, "dropped": True}, [])
    assert st.snapshot() == snap
    applied = st.apply({"op": "lease_expire", "leases": [1], "epoch": 5})
    assert applied.result["expired"] == [1]


@pytest.mark.parametrize(
    ("entry_term", "epoch", "dropped"),
    [
        (None, 6, False),  # outside Raft (unit tests, the jepsen model): the epoch rule alone
        (6, 6, False),  # proposed by the leader of the entry's term
        (7, 6, True),  # a deposed leader's expiry carried by the next leader's entry
        (5, 6, True),  # an entry older than the expiry's epoch cannot carry it either
    ],
)
def test_expiry_must_come_from_the_entry_term(entry_term: int | None, epoch: int, dropped: bool) -> None:
    st = state_with(*WORLD, {"op": "leader_epoch", "epoch": 5})
    snap = st.snapshot()
    applied = st.apply({"op": "lease_expire", "leases": [1], "epoch": epoch}, entry_term=entry_term)
    assert applied.result["dropped"] is dropped
    if dropped:
        assert st.snapshot() == snap
    else:
        assert applied.result["expired"] == [1]


def test_expiry_raises_epoch() -> None:
    st = state_with(*WORLD)
    st.apply({"op": "lease_expire", "leases": [], "epoch": 9})
    assert st.epoch == 9 and st.revision == WORLD_REV
    st.apply({"op": "leader_epoch", "epoch": 3})
    assert st.epoch == 9
    assert st.apply({"op": "lease_expire", "leases": [1], "epoch": 8}).result["dropped"] is True


def test_lock_tokens_grow_across_holders() -> None:
    st = state_with(*WORLD, GRANT)
    first = st.get_lock("leader")["token"]
    st.apply({"op": "lock_release", "name": "leader", "lease": 1})
    second = st.apply({"op": "lock_acquire", "name": "leader", "lease": 2, "holder": "b"}).result["token"]
    assert second > first
    assert st.get_lock("leader") == {
        "name": "leader",
        "lease": 2,
        "holder": "b",
        "token": second,
        "create_revision": second,
    }
    with pytest.raises(NotFound):
        st.get_lock("free")


def test_events_share_records_that_never_change() -> None:
    st = state_with(*WORLD)
    created = st.apply(reg("web", "w9")).events[0]["after"]
    frozen = copy.deepcopy(created)
    st.apply({"op": "set_status", "service": "web", "id": "w9", "status": "critical"})
    st.apply(reg("web", "w9", port=9))
    st.apply({"op": "deregister", "service": "web", "id": "w9"})
    assert created == frozen


def test_queries_return_copies() -> None:
    st = state_with(*WORLD, {"op": "service_put", "name": "web", "meta": {"a": "b"}, "tags": ["t"]})
    snap = st.snapshot()
    svc = st.get_service("web")
    svc["service"]["meta"]["x"] = "y"
    svc["service"]["tags"].append("z")
    svc["instances"][0]["port"] = 1
    st.get_instance("web", "w1")["meta"]["q"] = "r"
    st.get_key("plain")["value"] = "changed"
    st.list_services()[0]["tags"].append("z")
    assert st.snapshot() == snap


def test_queries() -> None:
    st = state_with(
        *WORLD,
        {"op": "service_put", "name": "api", "tags": ["b"]},
        {"op": "set_status", "service": "web", "id": "w1", "status": "critical"},
        reg("web", "w3", tags=["blue", "canary"]),
        reg("web", "w4", tags=["blue"]),
    )
    assert st.list_services() == [
        {"name": "api", "tags": ["b"], "meta": {}, "instances": 0, "passing": 0, "instance_tags": []},
        # instance_tags: the union of the instances' tags, sorted (what `service list` shows as TAGS).
        {"name": "web", "tags": [], "meta": {}, "instances": 4, "passing": 3, "instance_tags": ["blue", "canary"]},
    ]
    assert st.get_lease(1) == {
        "lease": 1,
        "ttl_ms": 5000,
        "granted_ms": 1000,
        "instances": [["web", "w2"]],
        "locks": ["leader"],
        "keys": ["cfg/a"],
    }
    assert st.list_leases() == [
        {"lease": 1, "ttl_ms": 5000, "granted_ms": 1000, "instances": 1, "locks": 1, "keys": 1}
    ]
    assert st.lease_ttls() == {1: 5000}
    assert [k["key"] for k in st.list_keys("")] == ["cfg/a", "plain"]
    assert [k["key"] for k in st.list_keys("cfg/")] == ["cfg/a"]
    assert st.list_keys("zzz") == []
    assert st.get_key("plain") == {
        "key": "plain",
        "value": "y",
        "lease": None,
        "create_revision": 5,
        "mod_revision": 5,
    }
    inst = st.get_instance("web", "w2")
    assert inst == {
        "service": "web",
        "id": "w2",
        "address": "10.0.0.1",
        "port": 80,
        "meta": {},
        "tags": [],
        "weight": 1,
        "status": "passing",
        "lease": 1,
        "create_revision": 3,
        "mod_revision": 3,
    }
    failing: list[tuple[Callable[..., Any], tuple[Any, ...], type[RegistryError]]] = [
        (st.get_service, ("nope",), NotFound),
        (st.get_instance, ("web", "nope"), NotFound),
        (st.get_instance, ("nope", "w1"), NotFound),
        (st.get_lease, (9,), NotFound),
        (st.get_key, ("nope",), NotFound),
        (st.get_service, (3,), BadRequest),
        (st.get_lease, ("1",), BadRequest),
        (st.get_lease, (0,), InvalidArgument),
    ]
    for query, args, exc in failing:
        with pytest.raises(exc):
            query(*args)


def test_normalisation() -> None:
    cmd = validate_command(reg(meta={"b": "1", "a": "2"}, tags=("x", "y", "x"), weight=None))
    assert list(cmd["meta"]) == ["a", "b"]
    assert cmd["tags"] == ["x", "y"]
    assert cmd["weight"] == 1 and cmd["status"] == "passing" and cmd["lease"] is None
    assert cmd["rid"] is None and cmd["now_ms"] is None
    assert validate_command(cmd) == cmd
    expire = validate_command({"op": "lease_expire", "leases": [3, 1, 3], "epoch": 0})
    assert expire["leases"] == [1, 3]


def test_validate_command_does_not_alias_input() -> None:
    raw = reg(meta={"a": "1"}, tags=["t"])
    st = RegistryState()
    st.apply(raw)
    raw["meta"]["a"] = "mutated"
    raw["tags"].append("mutated")
    assert st.get_instance("web", "w1")["meta"] == {"a": "1"}
    assert st.get_instance("web", "w1")["tags"] == ["t"]


# ---------------------------------------------------------------------------
# De-duplication
# ---------------------------------------------------------------------------


def test_dedup_success_replayed() -> None:
    st = state_with(*WORLD)
    first = st.apply({**reg("web", "w5"), "rid": "r1"})
    snap = st.snapshot()
    again = st.apply({**reg("web", "w5", port=1), "rid": "r1"})
    assert again == Applied(first.result, [])
    assert st.snapshot() == snap
    assert st.get_instance("web", "w5")["port"] == 80


def test_dedup_error_replayed() -> None:
    st = state_with(*WORLD)
    with pytest.raises(NotFound) as first:
        st.apply({"op": "deregister", "service": "web", "id": "later", "rid": "r2"})
    st.apply(reg("web", "later"))
    with pytest.raises(NotFound) as again:
        st.apply({"op": "deregister", "service": "web", "id": "later", "rid": "r2"})
    assert again.value.message == first.value.message
    st.get_instance("web", "later")


def test_dedup_survives_snapshot() -> None:
    st = state_with(*WORLD)
    first = st.apply({"op": "lease_grant", "ttl_ms": 2000, "now_ms": 5, "rid": "g"})
    with pytest.raises(Conflict):
        st.apply({"op": "key_put", "key": "plain", "value": "", "if_mod_revision": 1, "rid": "c"})
    restored = RegistryState.restore(st.snapshot())
    assert (
        restored.apply({"op": "lease_grant", "ttl_ms": 2000, "now_ms": 5, "rid": "g"}).result == first.result
    )
    with pytest.raises(Conflict, match="is 5"):
        restored.apply({"op": "key_put", "key": "plain", "value": "", "if_mod_revision": 5, "rid": "c"})


def test_dedup_validation_errors_not_stored() -> None:
    st = state_with(*WORLD)
    snap = st.snapshot()
    with pytest.raises(InvalidArgument):
        st.apply(reg(port=0, rid="v"))
    assert st.snapshot() == snap
    st.apply(reg(rid="v"))  # the fixed retry applies


def test_barrier_not_deduplicated() -> None:
    st = state_with(*WORLD)
    assert st.apply({"op": "barrier", "rid": "b"}).result == {"revision": WORLD_REV}
    st.apply(GRANT)
    assert st.apply({"op": "barrier", "rid": "b"}).result == {"revision": WORLD_REV + 1}


def test_dedup_fifo_eviction() -> None:
    st = RegistryState(StateLimits(dedup_entries_max=3))

    def put(i: int) -> int:
        applied = st.apply({"op": "key_put", "key": f"k{i}", "value": "", "rid": f"r{i}"})
        return int(applied.result["revision"])

    assert [put(i) for i in range(4)] == [1, 2, 3, 4]  # table: r1 r2 r3
    assert put(2) == 3  # replayed; a replay does not refresh the entry (FIFO, not LRU)
    assert put(0) == 5  # r0 was evicted: applies again; table: r2 r3 r0
    assert put(1) == 6  # table: r3 r0 r1 -- r2 went despite its recent replay
    assert put(2) == 7
    assert put(1) == 6
    assert len(st._dedup) == 3


def test_dedup_replay_result_is_a_copy() -> None:
    st = state_with(*WORLD)
    first = st.apply({"op": "lease_expire", "leases": [1], "epoch": 1, "rid": "e"})
    first.result["expired"].append(99)
    again = st.apply({"op": "lease_expire", "leases": [1], "epoch": 1, "rid": "e"})
    assert again.result["expired"] == [1]


# ---------------------------------------------------------------------------
# Snapshot / restore
# ---------------------------------------------------------------------------


def test_snapshot_round_trip() -> None:
    st = state_with(
        *WORLD,
        {"op": "service_put", "name": "api", "meta": {"z": "1", "a": "\u00e9"}, "tags": ["t"]},
        {"op": "leader_epoch", "epoch": 4},
        {"op": "set_status", "service": "web", "id": "w2", "status": "warning", "rid": "s"},
    )
    snap = st.snapshot()
    restored = RegistryState.restore(snap)
    assert restored.snapshot() == snap
    assert (restored.revision, restored.epoch) == (st.revision, st.epoch)
    assert restored.list_services() == st.list_services()
    assert restored.get_lease(1) == st.get_lease(1)
    # The rebuilt lease index works: revoke has the same effect on both.
    a = st.apply({"op": "lease_revoke", "lease": 1})
    b = restored.apply({"op": "lease_revoke", "lease": 1})
    assert a == b
    assert st.snapshot() == restored.snapshot()
    assert restored.apply(GRANT).result["lease"] == 2  # counter restored
    assert RegistryState.restore(RegistryState().snapshot()).snapshot() == RegistryState().snapshot()


def test_the_note_of_the_last_status_change_is_kept_with_the_instance() -> None:
    st = state_with(reg("web", "w1"), reg("web", "w2"))
    assert "note" not in st.get_instance("web", "w1")  # a record carries a note only while it has one
    st.apply({"op": "set_status", "service": "web", "id": "w1", "status": "critical", "note": "disk full"})
    assert st.get_instance("web", "w1")["note"] == "disk full"
    rev = st.revision
    # The same status again changes nothing, its note included: a check's varying output costs no write.
    out = st.apply({"op": "set_status", "service": "web", "id": "w1", "status": "critical", "note": "disk fuller"})
    assert out.result["changed"] is False and st.revision == rev
    assert st.get_instance("web", "w1")["note"] == "disk full"
    # It survives a snapshot, and a bad one is refused on restore.
    snap = st.snapshot()
    assert RegistryState.restore(snap).get_instance("web", "w1")["note"] == "disk full"
    decoded = msgpack.unpackb(snap, raw=False)
    for bad in ("", 5, "x" * (model.NOTE_CHARS_MAX + 1)):
        broken = copy.deepcopy(decoded)
        next(i for i in broken["instances"] if i["id"] == "w1")["note"] = bad
        with pytest.raises(BadRequest):
            RegistryState.restore(msgpack.packb(broken, use_bin_type=True))
    # A change without a note clears it.
    st.apply({"op": "set_status", "service": "web", "id": "w1", "status": "passing"})
    assert "note" not in st.get_instance("web", "w1")


def test_snapshot_is_canonical() -> None:
    a = state_with({"op": "service_put", "name": "b"}, {"op": "service_put", "name": "a"})
    b = state_with({"op": "service_put", "name": "a"}, {"op": "service_put", "name": "b"})
    a.apply({"op": "service_put", "name": "b"})
    b.apply({"op": "service_put", "name": "b"})
    # Same content, revisions differ per record: compare only the ordering.
    sa = msgpack.unpackb(a.snapshot())
    assert [s["name"] for s in sa["services"]] == ["a", "b"]
    assert sa["format"] == 1


def _mutated_snapshot(mutate: Any) -> bytes:
    obj = msgpack.unpackb(state_with(*WORLD, {"op": "barrier", "rid": "x"}, reg(rid="y")).snapshot())
    mutate(obj)
    return bytes(msgpack.packb(obj))


CORRUPT: list[tuple[str, Any]] = [
    ("empty", b""),
    ("garbage", b"\xc1\xff\x00"),
    ("truncated", state_with(*WORLD).snapshot()[:-3]),
    ("trailing bytes", state_with(*WORLD).snapshot() + b"\x00"),
    ("pickle", pickle.dumps({"format": 1})),
    ("not a map", msgpack.packb([1, 2])),
    ("int keys", msgpack.packb({1: 2})),
    ("str not bytes", "snapshot"),
    ("future format", _mutated_snapshot(lambda o: o.update(format=2))),
    ("bool format", _mutated_snapshot(lambda o: o.update(format=True))),
    ("missing key", _mutated_snapshot(lambda o: o.pop("locks"))),
    ("extra key", _mutated_snapshot(lambda o: o.update(extra=1))),
    ("negative revision", _mutated_snapshot(lambda o: o.update(revision=-1))),
    ("revision behind records", _mutated_snapshot(lambda o: o.update(revision=2))),
    ("services not list", _mutated_snapshot(lambda o: o.update(services={}))),
    ("bad service name", _mutated_snapshot(lambda o: o["services"][0].update(name="a b"))),
    ("record extra field", _mutated_snapshot(lambda o: o["services"][0].update(x=1))),
    ("record missing field", _mutated_snapshot(lambda o: o["instances"][0].pop("port"))),
    ("port out of range", _mutated_snapshot(lambda o: o["instances"][0].update(port=0))),
    ("bool weight", _mutated_snapshot(lambda o: o["instances"][0].update(weight=True))),
    ("orphan instance", _mutated_snapshot(lambda o: o["instances"][0].update(service="ghost"))),
    ("duplicate instance", _mutated_snapshot(lambda o: o["instances"].append(o["instances"][0]))),
    ("instance on missing lease", _mutated_snapshot(lambda o: o["instances"][1].update(lease=7))),
    ("key on missing lease", _mutated_snapshot(lambda o: o["keys"][0].update(lease=7))),
    ("lock on missing lease", _mutated_snapshot(lambda o: o["locks"][0].update(lease=7))),
    ("lock token mismatch", _mutated_snapshot(lambda o: o["locks"][0].update(token=5))),
    ("lease beyond counter", _mutated_snapshot(lambda o: o.update(next_lease=1))),
    ("lease ttl out of range", _mutated_snapshot(lambda o: o["leases"][0].update(ttl_ms=1))),
    ("create after mod", _mutated_snapshot(lambda o: o["keys"][0].update(create_revision=6))),
    ("dedup bad entry", _mutated_snapshot(lambda o: o["dedup"].append(["z"]))),
    (
        "dedup bad code",
        _mutated_snapshot(lambda o: o["dedup"].append(["z", {"error": "NOPE", "message": ""}])),
    ),
    (
        "dedup future result",
        _mutated_snapshot(lambda o: o["dedup"].append(["z", {"result": {"revision": 99}}])),
    ),
    ("dedup duplicate rid", _mutated_snapshot(lambda o: o["dedup"].append(o["dedup"][0]))),
]


@pytest.mark.parametrize("data", [c[1] for c in CORRUPT], ids=[c[0] for c in CORRUPT])
def test_corrupt_snapshot(data: Any) -> None:
    with pytest.raises(BadRequest) as info:
        RegistryState.restore(data)
    assert type(info.value) is BadRequest


def test_mutated_snapshot_helper_is_valid_unmutated() -> None:
    RegistryState.restore(_mutated_snapshot(lambda o: None))


def test_snapshot_never_pickles() -> None:
    snap = state_with(*WORLD).snapshot()
    assert not snap.startswith(b"\x80")
    assert msgpack.unpackb(snap)["format"] == 1


def test_lease_storage_is_compact_and_reads_back_whole() -> None:
    # A bare lease is one packed int and no attachment entry; queries, events and snapshots see the record.
    st = RegistryState()
    granted = st.apply({"op": "lease_grant", "ttl_ms": 86_400_000, "now_ms": 1_764_000_000_123})
    (event,) = granted.events
    record = {"lease": 1, "ttl_ms": 86_400_000, "granted_ms": 1_764_000_000_123}
    assert event["after"] == record
    assert st.get_lease(1) == {**record, "instances": [], "locks": [], "keys": []}
    assert st.lease_ttl_ms(1) == 86_400_000 and st.lease_ttl_ms(2) is None and st.lease_count() == 1
    assert type(st._leases[1]) is int and st._attached == {}
    # Attaching creates the entry; detaching everything leaves an equivalent (empty) state.
    st.apply(reg("web", "w9", lease=1))
    assert st.get_lease(1)["instances"] == [["web", "w9"]]
    st.apply({"op": "deregister", "service": "web", "id": "w9"})
    st.check_invariants()
    restored = RegistryState.restore(st.snapshot())
    assert restored.snapshot() == st.snapshot()
    assert restored.get_lease(1) == st.get_lease(1)
    assert restored.list_leases() == st.list_leases() == [{**record, "instances": 0, "locks": 0, "keys": 0}]
    revoked = st.apply({"op": "lease_revoke", "lease": 1})
    assert [e["before"] for e in revoked.events if e["kind"] == "lease"] == [record]
    assert st.lease_count() == 0 and st._attached == {}
