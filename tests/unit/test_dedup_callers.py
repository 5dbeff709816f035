"""Request ids are remembered per caller, and only for authorized commands (issue #20, finding 2).

Before: the table was keyed by rid alone and remembered every refusal, so a
caller with no permission (or no real token) could read another caller's
outcome by reusing its rid, and flush every legitimate retry record by
sending refused commands with fresh rids.
"""

from __future__ import annotations

from typing import Any

import pytest

from registry.errors import NotFound, PermissionDenied, Unauthenticated
from registry.fsm import acl
from registry.fsm.state import RegistryState

H_ADMIN = acl.hash_secret("admin-secret")
H_RO = acl.hash_secret("ro-secret")
H_JUNK = acl.hash_secret("not a token")


def booted() -> RegistryState:
    st = RegistryState()
    st.apply({"op": "acl_bootstrap", "token_id": "admin", "secret_hash": H_ADMIN})
    st.apply({"op": "acl_role_put", "name": "ro", "rules": ["key:=read"], "auth": H_ADMIN, "now_ms": 1})
    st.apply({"op": "acl_token_create", "token_id": "ro", "secret_hash": H_RO, "roles": ["ro"], "auth": H_ADMIN,
              "now_ms": 1})
    return st


def put(key: str, value: str, rid: str, auth: str | None) -> dict[str, Any]:
    return {"op": "key_put", "key": key, "value": value, "rid": rid, "auth": auth, "now_ms": 1}


@pytest.mark.parametrize(
    ("intruder", "error"),
    [
        (H_JUNK, Unauthenticated),  # not a token at all
        (H_RO, PermissionDenied),  # a real token without write on the key
    ],
)
def test_another_callers_rid_answers_nothing(intruder: str, error: type[Exception]) -> None:
    st = booted()
    first = st.apply(put("cfg/a", "1", "rid-1", H_ADMIN))
    records = len(st._dedup)
    # The same rid from another caller is that caller's own command: authorized (and refused) as such.
    with pytest.raises(error):
        st.apply(put("cfg/a", "stolen", "rid-1", intruder))
    assert len(st._dedup) == records  # a refusal by authorization is not remembered
    # The owner's retry still gets its original outcome, without applying again.
    again = st.apply(put("cfg/a", "1", "rid-1", H_ADMIN))
    assert again.result == first.result and again.events == []
    assert st.get_key("cfg/a")["value"] == "1"


def test_refused_commands_cannot_flush_retry_records() -> None:
    st = booted()
    st.apply(put("cfg/a", "1", "owner-rid", H_ADMIN))
    records = len(st._dedup)
    for i in range(st._limits.dedup_entries_max + 10):
        with pytest.raises(Unauthenticated):
            st.apply(put("cfg/a", "x", f"junk-{i}", H_JUNK))
    assert len(st._dedup) == records
    assert st.apply(put("cfg/a", "1", "owner-rid", H_ADMIN)).events == []  # still remembered: not re-applied


def test_a_handler_error_is_remembered_for_its_caller_only() -> None:
    st = booted()
    delete = {"op": "key_delete", "key": "cfg/a", "rid": "del", "auth": H_ADMIN, "now_ms": 1}
    with pytest.raises(NotFound):
        st.apply(dict(delete))
    st.apply(put("cfg/a", "1", "create", H_ADMIN))
    # The retry gets the remembered refusal: it does not delete the key created meanwhile.
    with pytest.raises(NotFound):
        st.apply(dict(delete))
    assert st.get_key("cfg/a")["value"] == "1"


def test_without_acls_a_rid_is_shared_as_before() -> None:
    st = RegistryState()
    first = st.apply(put("k", "1", "r", None))
    assert st.apply(put("k", "other", "r", None)).result == first.result
    assert st.get_key("k")["value"] == "1"


def test_snapshot_keeps_each_callers_records() -> None:
    st = booted()
    st.apply(put("cfg/a", "1", "same-rid", H_ADMIN))
    restored = RegistryState.restore(st.snapshot())
    assert restored.snapshot() == st.snapshot()
    assert restored.apply(put("cfg/a", "1", "same-rid", H_ADMIN)).events == []
    with pytest.raises(Unauthenticated):
        restored.apply(put("cfg/a", "1", "same-rid", H_JUNK))
