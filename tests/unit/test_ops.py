"""The op table: every set of ops is derived from it and agrees with the schemas and handlers."""

from __future__ import annotations

import pytest

from registry.fsm import ops
from registry.fsm.commands import SCHEMAS
from registry.fsm.state import _HANDLERS


def test_commands_match_schemas_and_state_handlers() -> None:
    assert ops.COMMAND_OPS == frozenset(SCHEMAS) == frozenset(_HANDLERS)


@pytest.mark.parametrize(
    ("derived", "want"),
    [
        (ops.WRITE_OPS, {"register", "deregister", "set_status", "service_put", "service_delete", "key_put",
                         "key_delete", "lock_acquire", "lock_release", "lease_grant", "lease_revoke"}),
        (ops.ANONYMOUS_OPS, {"status", "acl_bootstrap", "login"}),
        (ops.FILTERED_OPS, {"service_list", "service_dump", "key_list", "watch"}),
        (ops.NO_BARRIER_OPS, {"lease_keepalive", "lease_keepalive_batch"}),
        (ops.SELF_CHECKED_OPS, {"acl_token_create", "acl_user_put"}),
        (ops.CLIENT_COMMAND_OPS - ops.WRITE_OPS, {"acl_token_delete", "acl_role_put", "acl_role_delete",
                                                  "acl_user_delete", "intention_put", "intention_delete",
                                                  "intention_default_set"}),
    ],
    ids=["write", "anonymous", "filtered", "no_barrier", "self_checked", "acl_write"],
)
def test_derived_sets(derived: frozenset[str], want: set[str]) -> None:
    assert derived == want


def test_internal_commands_are_never_client_requests() -> None:
    internal = {name for name, spec in ops.OP_TABLE.items() if spec.served == "internal"}
    assert internal == {"barrier", "lease_expire", "leader_epoch", "identity_put", "identity_delete"}
    assert not internal & ops.REQUEST_OPS
    # A command only nodes propose needs admin on cluster if it ever reached an ACL check.
    assert all(ops.op_permission(op, {}) == ("admin", "cluster") for op in internal)


def test_unknown_op_is_denied_by_default() -> None:
    assert ops.op_permission("no_such_op", {}) == ("admin", "cluster")
