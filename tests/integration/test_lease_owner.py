"""A lease belongs to the token that granted it (issue #20, finding 3).

Before: revoke and keepalive needed only ``write`` on ``lease`` and ids count
up from 1, so the documented ``web-agent`` role could revoke ``db``'s lease
(deregistering its instances, deleting its keys) or keep a dead instance alive
forever, and ``read`` on lease showed every name attached to any lease.
"""

from __future__ import annotations

from typing import Any

import pytest

from registry.client import SyncClient
from registry.errors import PermissionDenied
from tests.support.cluster import Cluster, acl_bootstrap

pytestmark = pytest.mark.integration


def agent(cluster: Cluster, admin: SyncClient, role: str, rules: list[str]) -> SyncClient:
    admin.call("acl_role_put", {"name": role, "rules": rules})
    _, body = admin.call("acl_token_create", {"roles": [role], "description": role})
    return cluster.client(token=body["secret"])


def test_one_agent_cannot_use_another_agents_lease(acl_cluster: Cluster) -> None:
    c = acl_cluster
    admin = c.client(token=acl_bootstrap(c))
    db = agent(c, admin, "db-agent", ["service:db*=read,register", "lease=read,write", "key:db/=read,write"])
    web = agent(c, admin, "web-agent", ["service:web*=read,register", "lease=read,write", "key:web/=read,write"])
    lease = db.lease_grant(10_000)
    db.register("db", "d1", "10.0.0.1", 5432, lease=lease)
    db.call("key_put", {"key": "db/primary", "value": "d1", "lease": lease})

    attacks: list[tuple[str, Any]] = [
        ("revoke", lambda: web.lease_revoke(lease)),
        ("keepalive", lambda: web.lease_keepalive(lease)),
        ("keepalive batch", lambda: web.lease_keepalive_many([lease])),
        ("attach an instance", lambda: web.register("web", "w1", "10.0.0.2", 80, lease=lease)),
        ("attach a key", lambda: web.call("key_put", {"key": "web/x", "value": "1", "lease": lease})),
        ("take a lock", lambda: web.call("lock_acquire", {"name": "web/lock", "lease": lease, "holder": "w"})),
    ]
    for what, attack in attacks:
        with pytest.raises(PermissionDenied):
            attack()
            pytest.fail(f"web-agent could {what} db-agent's lease")

    # db's lease and everything on it are untouched; its owner and an admin may use it.
    _, service = db.get_service("db")
    assert [i["id"] for i in service["instances"]] == ["d1"]
    assert db.lease_keepalive(lease) > 0
    # What web may see of db's lease: the lease, not the names attached to it.
    _, seen = web.call("lease_get", {"lease": lease})
    assert seen["instances"] == [] and seen["keys"] == [] and seen["locks"] == []
    _, own = db.call("lease_get", {"lease": lease})
    assert own["instances"] == [["db", "d1"]] and own["keys"] == ["db/primary"]
    assert admin.lease_revoke(lease)["instances"] == 1
