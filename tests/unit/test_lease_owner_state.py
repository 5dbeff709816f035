"""Lease ownership in the state machine (issue #20, finding 3): who may use a lease, and snapshots keep it."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from registry.errors import BadRequest, PermissionDenied
from registry.fsm import acl
from registry.fsm.state import RegistryState

H_ADMIN = acl.hash_secret("admin")
H_DB = acl.hash_secret("db")
H_WEB = acl.hash_secret("web")
H_LEASE_ADMIN = acl.hash_secret("lease-admin")


def booted() -> RegistryState:
    st = RegistryState()
    st.apply({"op": "acl_bootstrap", "token_id": "admin", "secret_hash": H_ADMIN})
    roles = {
        "db": ["service:*=register", "lease=write", "key:=write"],
        "web": ["service:web*=register", "lease=write", "key:=write"],
        "lease-admin": ["lease=admin", "service:*=register", "key:=write"],
    }
    for role, rules in roles.items():
        st.apply({"op": "acl_role_put", "name": role, "rules": rules, "auth": H_ADMIN, "now_ms": 1})
    for token, secret_hash in (("db", H_DB), ("web", H_WEB), ("lease-admin", H_LEASE_ADMIN)):
        st.apply({"op": "acl_token_create", "token_id": token, "secret_hash": secret_hash, "roles": [token],
                  "auth": H_ADMIN, "now_ms": 1})
    return st


def grant(st: RegistryState, auth: str | None) -> int:
    lease: int = st.apply({"op": "lease_grant", "ttl_ms": 5000, "auth": auth, "now_ms": 1}).result["lease"]
    return lease


def uses(lease: int) -> dict[str, dict[str, Any]]:
    return {
        "revoke": {"op": "lease_revoke", "lease": lease},
        "register": {"op": "register", "service": "web", "id": "w1", "address": "10.0.0.1", "port": 80,
                     "lease": lease},
        "key_put": {"op": "key_put", "key": "k", "value": "v", "lease": lease},
        "lock_acquire": {"op": "lock_acquire", "name": "l", "lease": lease, "holder": "h"},
    }


@pytest.mark.parametrize("use", ["revoke", "register", "key_put", "lock_acquire"])
@pytest.mark.parametrize(
    ("user", "allowed"),
    [
        (H_DB, True),  # the granting token
        (H_WEB, False),  # another token with write on lease
        (H_LEASE_ADMIN, True),  # admin on lease
        (H_ADMIN, True),  # the management token
    ],
)
def test_who_may_use_a_lease(use: str, user: str, allowed: bool) -> None:
    st = booted()
    lease = grant(st, H_DB)
    command = {**uses(lease)[use], "auth": user, "now_ms": 1}
    if allowed:
        st.apply(command)
    else:
        before = st.snapshot()
        with pytest.raises(PermissionDenied, match="belongs to another token"):
            st.apply(command)
        assert st.snapshot() == before


def test_a_lease_granted_with_acls_off_needs_admin() -> None:
    st = booted()
    lease = grant(st, None)
    with pytest.raises(PermissionDenied):
        st.apply({**uses(lease)["revoke"], "auth": H_DB, "now_ms": 1})
    st.apply({**uses(lease)["revoke"], "auth": H_LEASE_ADMIN, "now_ms": 1})


def test_lock_release_needs_the_owner_too() -> None:
    st = booted()
    lease = grant(st, H_DB)
    st.apply({**uses(lease)["lock_acquire"], "auth": H_DB, "now_ms": 1})
    with pytest.raises(PermissionDenied):
        st.apply({"op": "lock_release", "name": "l", "lease": lease, "auth": H_WEB, "now_ms": 1})
    st.apply({"op": "lock_release", "name": "l", "lease": lease, "auth": H_DB, "now_ms": 1})


def test_owners_survive_a_snapshot_and_leave_with_their_lease() -> None:
    st = booted()
    lease = grant(st, H_DB)
    restored = RegistryState.restore(st.snapshot())
    assert restored.snapshot() == st.snapshot()
    with pytest.raises(PermissionDenied):
        restored.apply({**uses(lease)["revoke"], "auth": H_WEB, "now_ms": 1})
    restored.apply({**uses(lease)["revoke"], "auth": H_DB, "now_ms": 1})
    assert "lease_owners" not in msgpack.unpackb(restored.snapshot())
    # A state that never used ACLs snapshots as before: no owners section.
    plain = RegistryState()
    grant(plain, None)
    assert "lease_owners" not in msgpack.unpackb(plain.snapshot())


@pytest.mark.parametrize(
    "owners",
    [
        [[99, "db"]],  # a lease that does not exist
        [[1, "db"], [1, "web"]],  # twice
        [[1, ""]],  # not a token id
        [["1", "db"]],
        [[1]],
    ],
)
def test_restore_refuses_bad_owner_entries(owners: list[Any]) -> None:
    st = booted()
    grant(st, H_DB)
    obj = msgpack.unpackb(st.snapshot())
    obj["lease_owners"] = owners
    with pytest.raises(BadRequest):
        RegistryState.restore(msgpack.packb(obj))
