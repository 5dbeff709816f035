"""Expired tokens are removed, and each user holds a bounded number of login tokens (issue #20, finding 7).

Before, expired tokens were never removed and every login added one, so any
user with a password could fill the token table (100,000) alone.
"""

from __future__ import annotations

from typing import Any

import pytest

from registry.errors import Unauthenticated
from registry.fsm import acl
from registry.fsm.state import EXPIRED_TOKENS_PER_COMMAND_MAX, LOGIN_TOKENS_PER_USER_MAX, RegistryState

H_ADMIN = acl.hash_secret("admin")


def booted() -> RegistryState:
    st = RegistryState()
    st.apply({"op": "acl_bootstrap", "token_id": "admin", "secret_hash": H_ADMIN})
    st.apply({"op": "acl_role_put", "name": "ops", "rules": ["service:*=read"], "auth": H_ADMIN, "now_ms": 1})
    return st


def create(st: RegistryState, token_id: str, now_ms: int, *, login: str = "",
           expires_ms: int | None = None) -> dict[str, Any]:
    result: dict[str, Any] = st.apply({
        "op": "acl_token_create", "token_id": token_id, "secret_hash": acl.hash_secret(token_id), "roles": ["ops"],
        "description": f"login {login}" if login else "", "expires_ms": expires_ms, "login": login,
        "now_ms": now_ms}).result
    return result


def ids(st: RegistryState) -> list[str]:
    return [t["id"] for t in st.acl_token_list()]


@pytest.mark.parametrize("logins", [1, LOGIN_TOKENS_PER_USER_MAX, LOGIN_TOKENS_PER_USER_MAX + 1, 40])
def test_a_user_holds_at_most_the_cap_of_login_tokens_oldest_go_first(logins: int) -> None:
    st = booted()
    for i in range(logins):
        create(st, f"ann-{i:03}", 10 + i, login="ann", expires_ms=10**12)
    create(st, "bob-000", 100, login="bob", expires_ms=10**12)  # another user's tokens are not touched
    kept = [t for t in ids(st) if t.startswith("ann-")]
    expected = [f"ann-{i:03}" for i in range(max(0, logins - LOGIN_TOKENS_PER_USER_MAX), logins)]
    assert kept == expected
    assert "bob-000" in ids(st) and "admin" in ids(st)


def test_expired_tokens_are_removed_by_the_next_creation() -> None:
    st = booted()
    create(st, "short", 1, expires_ms=1000)
    create(st, "long", 1, expires_ms=10**12)
    create(st, "forever", 1)
    with pytest.raises(Unauthenticated):
        st.acl_authorize(acl.hash_secret("short"), "read", None, 1000)  # expired exactly at expires_ms
    assert "short" in ids(st)  # nothing is removed without a command
    result = create(st, "next", 1000)
    assert result["removed"] == 1
    assert ids(st) == sorted(["admin", "forever", "long", "next"])
    # A snapshot taken now restores to the same table.
    assert RegistryState.restore(st.snapshot()).acl_token_list() == st.acl_token_list()


def test_one_creation_removes_a_bounded_number() -> None:
    st = booted()
    for i in range(EXPIRED_TOKENS_PER_COMMAND_MAX + 5):
        create(st, f"old-{i:05}", 1, expires_ms=2 + i)
    assert create(st, "a", 10**9)["removed"] == EXPIRED_TOKENS_PER_COMMAND_MAX
    assert create(st, "b", 10**9)["removed"] == 5


def test_login_tokens_survive_a_snapshot() -> None:
    st = booted()
    for i in range(3):
        create(st, f"ann-{i}", 10 + i, login="ann", expires_ms=10**12)
    restored = RegistryState.restore(st.snapshot())
    assert restored.snapshot() == st.snapshot()
    assert [t.get("login") for t in restored.acl_token_list() if t["id"].startswith("ann")] == ["ann"] * 3
