"""The typed client methods (registry/client/calls.py) against a real cluster: the op names and
argument keys they send are the node's, and each refusal comes back as the node's error."""

from __future__ import annotations

import pytest

from registry.errors import Conflict, NotFound, PermissionDenied, RegistryError
from tests.support.cluster import Cluster

pytestmark = pytest.mark.integration


def test_every_typed_call_reaches_its_op(cluster: Cluster) -> None:
    with cluster.client() as c:
        rev, put = c.key_put("cfg/a", "1")
        assert put["revision"] == rev
        assert c.key_get("cfg/a")[1]["value"] == "1"
        assert c.key_get("cfg/a", consistency="stale")[1]["value"] == "1"
        with pytest.raises(Conflict):
            c.key_put("cfg/a", "2", if_mod_revision=rev - 1)
        c.key_put("cfg/b", "2")
        assert [k["key"] for k in c.key_list("cfg/")[1]] == ["cfg/a", "cfg/b"]
        c.key_delete("cfg/b")
        with pytest.raises(NotFound):
            c.key_get("cfg/b")

        lease = c.lease_grant(30_000)
        assert c.lease_get(lease)[1]["ttl_ms"] == 30_000
        assert lease in [item["lease"] for item in c.lease_list()[1]]
        assert 0 < c.lease_ttl(lease)[1]["remaining_ms"] <= 30_000
        c.lock_acquire("jobs/leader", lease, "me")
        assert c.lock_get("jobs/leader")[1]["holder"] == "me"
        c.lock_release("jobs/leader", lease)
        with pytest.raises(NotFound):
            c.lock_get("jobs/leader")

        c.service_put("web", meta={"team": "a"}, tags=["v1"])
        c.register("web", "w1", "10.0.0.1", 80)
        assert c.instance_get("web", "w1")[1]["address"] == "10.0.0.1"
        assert [s["service"]["name"] for s in c.service_dump()[1]] == ["web"]
        c.deregister("web", "w1")
        c.service_delete("web")

        c.intention_put("a", "b", "deny")
        assert c.intention_check("a", "b")[1]["action"] == "deny"
        assert len(c.intention_list()[1]["intentions"]) == 1
        c.intention_default_set("deny")
        c.intention_delete("a", "b")

        c.acl_role_put("reader", ["service:*=read"])
        assert [r["name"] for r in c.acl_role_list()[1]] == ["reader"]
        c.acl_user_put("ann", "correct horse battery", ["reader"])
        assert [u["name"] for u in c.acl_user_list()[1]] == ["ann"]
        token = c.acl_token_create(["reader"], description="for ann", ttl_ms=60_000)[1]
        assert [t["id"] for t in c.acl_token_list()[1]] == [token["id"]]
        c.acl_token_delete(token["id"])
        c.acl_user_delete("ann")
        c.acl_role_delete("reader")

        assert c.status()[1]["id"]
        members = c.member_list()[1]
        assert len(members["members"]) == 3
        with pytest.raises(RegistryError):
            c.member_remove("127.0.0.1:1")  # not a member: refused, nothing changes
        assert len(c.member_list()[1]["members"]) == 3


def test_login_without_users_is_refused(cluster: Cluster) -> None:
    with cluster.client() as c, pytest.raises((PermissionDenied, RegistryError)):
        c.login("nobody", "wrong password")
