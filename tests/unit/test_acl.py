"""ACLs: the pure evaluator, rule parsing, the ACL state commands, login limits."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import msgpack
import pytest

from registry.errors import (
    BadRequest,
    Conflict,
    InvalidArgument,
    LimitExceeded,
    NotFound,
    PermissionDenied,
    RegistryError,
    Unauthenticated,
)
from registry.fsm import acl
from registry.fsm.commands import validate_command
from registry.fsm.state import RegistryState
from registry.server.acl_service import LoginLimiter, hash_password, verify_password

H_ADMIN = acl.hash_secret("admin-secret")
H_RO = acl.hash_secret("ro-secret")
H_WEB = acl.hash_secret("web-secret")
H_OLD = acl.hash_secret("old-secret")
PW_HASH = "scrypt$16384$8$1$" + "0" * 32 + "$" + "1" * 128

ROLES: dict[str, dict[str, Any]] = {
    "ro": {"name": "ro", "rules": [acl.parse_rule("service:*=read"), acl.parse_rule("key:=read")]},
    "web": {"name": "web", "rules": [acl.parse_rule("service:web*=read,register"),
                                     acl.parse_rule("key:web/=write")]},
    "keys-admin": {"name": "keys-admin", "rules": [acl.parse_rule("key:cfg/=admin")]},
}
TOKENS: dict[str, dict[str, Any]] = {
    H_ADMIN: {"id": "admin", "roles": ["management"], "expires_ms": None},
    H_RO: {"id": "ro", "roles": ["ro"], "expires_ms": None},
    H_WEB: {"id": "web", "roles": ["web", "missing-role"], "expires_ms": None},
    H_OLD: {"id": "old", "roles": ["ro"], "expires_ms": 1000},
}

# (token hash, verb, resource, now_ms, expected: None = allowed, else the error class)
CASES: list[tuple[str | None, str, str | None, int, type[RegistryError] | None]] = [
    (None, "read", "service:web", 0, Unauthenticated),
    ("", "read", "service:web", 0, Unauthenticated),
    (acl.hash_secret("nope"), "read", "service:web", 0, Unauthenticated),
    (H_OLD, "read", "service:web", 999, None),
    (H_OLD, "read", "service:web", 1000, Unauthenticated),  # expired exactly at expires_ms
    (H_ADMIN, "admin", "acl", 0, None),
    (H_ADMIN, "write", "service:anything", 0, None),
    (H_ADMIN, "register", "lease", 0, None),
    (H_RO, "read", "service:db", 0, None),
    (H_RO, "read", "key:any/thing", 0, None),
    (H_RO, "register", "service:web", 0, PermissionDenied),
    (H_RO, "write", "service:web", 0, PermissionDenied),
    (H_RO, "write", "lease", 0, PermissionDenied),
    (H_RO, "admin", "acl", 0, PermissionDenied),
    (H_RO, "read", "acl", 0, PermissionDenied),
    (H_RO, "read", "intention", 0, PermissionDenied),
    (H_RO, "read", None, 0, None),  # authenticate only
    (H_WEB, "register", "service:web", 0, None),
    (H_WEB, "register", "service:web-api", 0, None),
    (H_WEB, "register", "service:db", 0, PermissionDenied),
    (H_WEB, "read", "service:db", 0, PermissionDenied),
    (H_WEB, "write", "service:web", 0, PermissionDenied),  # register is not write
    (H_WEB, "write", "key:web/x", 0, None),
    (H_WEB, "read", "key:web/x", 0, PermissionDenied),  # write does not imply read
    (H_WEB, "write", "key:db/x", 0, PermissionDenied),
    (H_WEB, "write", "key:webx", 0, PermissionDenied),  # prefix, not glob
]


@pytest.mark.parametrize(("token", "verb", "resource", "now", "want"), CASES)
def test_authorize_table(token: str | None, verb: str, resource: str | None, now: int,
                         want: type[RegistryError] | None) -> None:
    if want is None:
        assert acl.authorize(TOKENS, ROLES, token, verb, resource, now)["id"]
    else:
        with pytest.raises(want):
            acl.authorize(TOKENS, ROLES, token, verb, resource, now)


@pytest.mark.parametrize(("granted", "resource", "want"), [
    ("*", "acl", True), ("*", "service:x", True), ("acl", "acl", True), ("acl", "cluster", False),
    ("service:*", "service:db", True), ("service:web*", "service:web", True), ("service:web*", "service:xweb", False),
    ("service:db-?", "service:db-1", True), ("key:", "key:x", True), ("key:a/", "key:a", False),
    ("key:a", "service:a", False), ("service:a", "key:a", False), ("lease", "lease", True),
])
def test_resource_matches(granted: str, resource: str, want: bool) -> None:
    assert acl.resource_matches(granted, resource) is want


@pytest.mark.parametrize("text", ["", "service:x", "=read", "service:x=", "service:x=fly", "db=read",
                                  "keys:x=read", "service:x=read,,bogus"])
def test_parse_rule_rejects(text: str) -> None:
    with pytest.raises(InvalidArgument):
        acl.parse_rule(text)


def test_parse_rule_canonical() -> None:
    assert acl.parse_rule("service:web*=register, read,read") == {"resource": "service:web*",
                                                                  "verbs": ["read", "register"]}
    cmd = validate_command({"op": "acl_role_put", "name": "r", "rules": ["key:a=write,read"]})
    assert cmd["rules"] == ["key:a=read,write"]
    assert validate_command(cmd) == cmd


@pytest.mark.parametrize(("op", "args", "want"), [
    ("status", {}, None), ("acl_bootstrap", {}, None), ("login", {}, None),
    ("register", {"service": "web"}, ("register", "service:web")),
    ("deregister", {"service": "web"}, ("register", "service:web")),
    ("set_status", {"service": "web"}, ("register", "service:web")),
    ("service_put", {"name": "db"}, ("write", "service:db")),
    ("service_get", {"name": "db"}, ("read", "service:db")),
    ("instance_get", {"service": "db"}, ("read", "service:db")),
    ("service_list", {}, ("read", None)),
    ("key_put", {"key": "a/b"}, ("write", "key:a/b")),
    ("lock_acquire", {"name": "l"}, ("write", "key:l")),
    ("lease_grant", {}, ("write", "lease")), ("lease_keepalive", {}, ("write", "lease")),
    ("lease_keepalive_batch", {}, ("write", "lease")),
    ("lease_revoke", {}, ("write", "lease")), ("lease_list", {}, ("read", "lease")),
    ("watch", {"service": "web"}, ("read", "service:web")), ("watch", {"all": True}, ("read", None)),
    ("acl_token_create", {}, ("admin", "acl")), ("acl_token_list", {}, ("admin", "acl")),
    ("intention_put", {}, ("write", "intention")), ("intention_check", {}, ("read", "intention")),
    ("snapshot_save", {}, ("admin", "cluster")), ("member_add", {}, ("admin", "cluster")),
    ("member_list", {}, ("read", "cluster")), ("something_new", {}, ("admin", "cluster")),
])
def test_op_permission(op: str, args: dict[str, Any], want: tuple[str, str | None] | None) -> None:
    assert acl.op_permission(op, args) == want


# -- the state machine ----------------------------------------------------------------------------


def boot(st: RegistryState) -> None:
    st.apply({"op": "acl_bootstrap", "token_id": "admin", "secret_hash": H_ADMIN})
    st.apply({"op": "acl_role_put", "name": "ro", "rules": ["service:*=read"], "auth": H_ADMIN, "now_ms": 1})
    st.apply({"op": "acl_token_create", "token_id": "ro", "secret_hash": H_RO, "roles": ["ro"], "auth": H_ADMIN,
              "now_ms": 1})


def test_bootstrap_once() -> None:
    st = RegistryState()
    applied = st.apply({"op": "acl_bootstrap", "token_id": "admin", "secret_hash": H_ADMIN})
    assert st.acl_bootstrapped and applied.result["revision"] == 1
    with pytest.raises(Conflict):
        st.apply({"op": "acl_bootstrap", "token_id": "other", "secret_hash": H_RO})
    assert st.revision == 1


def test_auth_checked_at_apply_and_revocation_is_immediate() -> None:
    st = RegistryState()
    boot(st)
    reg = {"op": "register", "service": "web", "id": "w1", "address": "10.0.0.1", "port": 80, "now_ms": 5}
    with pytest.raises(PermissionDenied):
        st.apply({**reg, "auth": H_RO})
    with pytest.raises(Unauthenticated):
        st.apply({**reg, "auth": acl.hash_secret("unknown")})
    st.apply({**reg, "auth": H_ADMIN})
    st.apply({"op": "acl_token_delete", "token_id": "ro", "auth": H_ADMIN, "now_ms": 6})
    with pytest.raises(Unauthenticated):
        st.apply({"op": "deregister", "service": "web", "id": "w1", "auth": H_RO, "now_ms": 7})
    # Without auth (ACLs off, or internal commands) nothing is checked.
    st.apply({"op": "deregister", "service": "web", "id": "w1"})


def test_expired_token_refused_at_apply() -> None:
    st = RegistryState()
    boot(st)
    st.apply({"op": "acl_token_create", "token_id": "tmp", "secret_hash": H_OLD, "roles": ["management"],
              "expires_ms": 100, "auth": H_ADMIN, "now_ms": 1})
    st.apply({"op": "key_put", "key": "k", "value": "v", "auth": H_OLD, "now_ms": 99})
    with pytest.raises(Unauthenticated):
        st.apply({"op": "key_put", "key": "k", "value": "v", "auth": H_OLD, "now_ms": 100})


FAILING: list[tuple[str, dict[str, Any], type[RegistryError]]] = [
    ("denied", {"op": "acl_role_put", "name": "x", "rules": [], "auth": H_RO, "now_ms": 2}, PermissionDenied),
    ("second bootstrap", {"op": "acl_bootstrap", "token_id": "b2", "secret_hash": H_WEB}, Conflict),
    ("duplicate token id", {"op": "acl_token_create", "token_id": "ro", "secret_hash": H_WEB}, Conflict),
    ("duplicate secret", {"op": "acl_token_create", "token_id": "t9", "secret_hash": H_RO}, Conflict),
    ("unknown role", {"op": "acl_token_create", "token_id": "t9", "secret_hash": H_WEB, "roles": ["zz"]}, NotFound),
    ("builtin role", {"op": "acl_role_put", "name": "management", "rules": []}, Conflict),
    ("bad rule", {"op": "acl_role_put", "name": "x", "rules": ["db=read"]}, InvalidArgument),
    ("bad hash", {"op": "acl_token_create", "token_id": "t9", "secret_hash": "plain"}, InvalidArgument),
    ("bad password hash", {"op": "acl_user_put", "name": "u", "password_hash": "plaintext"}, InvalidArgument),
    ("missing token", {"op": "acl_token_delete", "token_id": "zz"}, NotFound),
    ("missing role", {"op": "acl_role_delete", "name": "zz"}, NotFound),
    ("missing user", {"op": "acl_user_delete", "name": "zz"}, NotFound),
    ("user unknown role", {"op": "acl_user_put", "name": "u", "password_hash": PW_HASH, "roles": ["zz"]}, NotFound),
    ("missing intention", {"op": "intention_delete", "source": "a", "destination": "b"}, NotFound),
    ("bad action", {"op": "intention_put", "source": "a", "destination": "b", "action": "maybe"}, InvalidArgument),
    ("auth not a hash", {"op": "barrier", "auth": "xyz"}, InvalidArgument),
]


@pytest.mark.parametrize(("name", "cmd", "err"), FAILING, ids=[c[0] for c in FAILING])
def test_a_command_that_raises_changes_nothing(name: str, cmd: dict[str, Any], err: type[RegistryError]) -> None:
    st = RegistryState()
    boot(st)
    before = st.snapshot()
    with pytest.raises(err):
        st.apply(copy.deepcopy(cmd))
    assert st.snapshot() == before


def test_events_and_reads_never_carry_secrets() -> None:
    st = RegistryState()
    boot(st)
    applied = st.apply({"op": "acl_user_put", "name": "ann", "password_hash": PW_HASH, "roles": ["ro"]})
    applied2 = st.apply({"op": "acl_token_delete", "token_id": "ro"})
    blob = msgpack.packb([applied.events, applied2.events, st.acl_token_list(), st.acl_user_list(),
                          st.acl_role_list()])
    for secret in (H_ADMIN, H_RO, PW_HASH):
        assert secret.encode() not in blob
    assert b"secret_hash" not in blob and b"password_hash" not in blob


def test_intentions() -> None:
    st = RegistryState()
    assert st.intention_check("a", "b") == {"action": "allow", "matched": None}
    st.apply({"op": "intention_put", "source": "a", "destination": "b", "action": "deny"})
    assert st.intention_check("a", "b")["action"] == "deny"
    assert st.intention_check("b", "a")["action"] == "allow"
    st.apply({"op": "intention_default_set", "action": "deny"})
    assert st.intention_check("b", "a")["action"] == "deny"
    rev = st.revision
    assert st.apply({"op": "intention_default_set", "action": "deny"}).result == {"revision": rev, "changed": False}
    st.apply({"op": "intention_delete", "source": "a", "destination": "b"})
    assert st.intention_list() == {"default": "deny", "intentions": []}


def test_snapshot_round_trip_and_compatibility() -> None:
    plain = RegistryState()
    plain.apply({"op": "register", "service": "web", "id": "w1", "address": "10.0.0.1", "port": 80})
    # No ACL use: the snapshot has no "acl" key (the same bytes as before ACLs existed).
    assert "acl" not in msgpack.unpackb(plain.snapshot())
    st = RegistryState()
    boot(st)
    st.apply({"op": "acl_user_put", "name": "ann", "password_hash": PW_HASH, "roles": ["ro"]})
    st.apply({"op": "intention_put", "source": "a", "destination": "b", "action": "deny"})
    data = st.snapshot()
    again = RegistryState.restore(data)
    assert again.snapshot() == data
    assert again.acl_bootstrapped
    assert again.acl_may(H_RO, "read", "service:x", 0) and not again.acl_may(H_RO, "write", "service:x", 0)
    with pytest.raises(Conflict):
        again.apply({"op": "acl_bootstrap", "token_id": "b2", "secret_hash": H_WEB})
    # Corrupt ACL sections are refused like any other corrupt data.
    obj = msgpack.unpackb(data)
    mutations: list[Callable[[dict[str, Any]], object]] = [
        lambda o: o["acl"].pop("tokens"),
        lambda o: o["acl"]["tokens"][0].update(secret_hash="x"),
        lambda o: o["acl"]["roles"][0].update(rules=[{"resource": "db", "verbs": ["read"]}]),
        lambda o: o["acl"].update(bootstrapped=1),
        lambda o: o.update(extra=1),
    ]
    for mutate in mutations:
        bad = copy.deepcopy(obj)
        mutate(bad)
        with pytest.raises(BadRequest):
            RegistryState.restore(msgpack.packb(bad))


def test_passwords_and_login_limiter() -> None:
    stored = hash_password("correct horse")
    assert verify_password("correct horse", stored) and not verify_password("wrong", stored)
    assert hash_password("correct horse") != stored  # salted
    validate_command({"op": "acl_user_put", "name": "u", "password_hash": stored})
    now = [0.0]
    limiter = LoginLimiter(failures_max=5, window_s=60, block_s=30, clock=lambda: now[0])
    keys = ["user:ann", "addr:1.2.3.4"]
    for _ in range(5):
        limiter.begin(keys)
        limiter.end(keys, ok=False)
        now[0] += 1
    with pytest.raises(LimitExceeded):
        limiter.begin(keys)
    with pytest.raises(LimitExceeded):
        limiter.begin(["user:bob", "addr:1.2.3.4"])  # same address, other user
    now[0] += 31
    limiter.begin(keys)
    limiter.end(keys, ok=True)
    # Failures spread beyond the window never block.
    for _ in range(10):
        limiter.begin(["user:slow"])
        limiter.end(["user:slow"], ok=False)
        now[0] += 20
    limiter.begin(["user:slow"])


def test_agent_intentions_watcher_applies_events() -> None:
    from registry.agent.intentions import IntentionsWatcher
    from registry.client import Client

    watcher = IntentionsWatcher(Client(["127.0.0.1:1"]))
    assert not watcher("a", "b")  # before the first load: fail closed (issue #20, finding 9)
    assert watcher.refused_unloaded == 1
    watcher.load(5, {"default": "allow", "intentions": [{"source": "a", "destination": "b", "action": "deny"}]})
    assert not watcher("a", "b") and watcher("b", "a")
    st = RegistryState()
    for cmd in ({"op": "intention_put", "source": "a", "destination": "b", "action": "deny"},
                {"op": "intention_put", "source": "c", "destination": "b", "action": "deny"}):
        for event in st.apply(cmd).events:
            watcher.apply(event)
    assert not watcher("c", "b")
    for event in st.apply({"op": "intention_delete", "source": "a", "destination": "b"}).events:
        watcher.apply(event)
    assert watcher("a", "b")
    for event in st.apply({"op": "intention_default_set", "action": "deny"}).events:
        watcher.apply(event)
    assert not watcher("x", "y")
    watcher.apply({"kind": "instance", "id": "w1", "before": None, "after": {}})  # ignored
    assert not watcher("x", "y")
