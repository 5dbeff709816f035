"""With ``--acl``, a write's token is checked where it arrives, before anything is proposed (issue #20, finding 2).

Before: any string passed as a token for state-machine writes; the command was
replicated and refused only at apply, its refusal was stored under its request
id in the shared table, and a stranger reusing someone's request id got that
caller's remembered answer.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from registry.client import Client
from registry.errors import Conflict, LimitExceeded, RegistryError, Unauthenticated
from tests.support.cluster import Cluster, NodeProc, acl_bootstrap, metric

pytestmark = pytest.mark.integration


def commands_proposed(node: NodeProc) -> float:
    return metric(node, "regctl_batch_commands_sum")


def proposals(node: NodeProc) -> float:
    return metric(node, "regctl_proposals_total")


def test_a_stranger_token_proposes_nothing_and_reads_no_one_elses_request_id(acl_cluster: Cluster) -> None:
    c = acl_cluster
    admin = c.client(token=acl_bootstrap(c))
    revision, _ = admin.call("key_put", {"key": "cfg/a", "value": "1", "rid": "owner-rid-1"})
    node = c.nodes[0]
    stranger = c.client([node.api], token="not-a-real-token")
    before = commands_proposed(node)
    # Reusing the owner's request id: before, the stranger got the owner's remembered success.
    with pytest.raises(Unauthenticated):
        stranger.call("key_put", {"key": "cfg/a", "value": "evil", "rid": "owner-rid-1"})
    # Fresh request ids, big values: before, each one was replicated and its refusal remembered.
    for i in range(50):
        with pytest.raises(Unauthenticated):
            stranger.call("key_put", {"key": f"junk/{i}", "value": "x" * 60_000, "rid": f"junk-{i}"})
    assert commands_proposed(node) == before, "a stranger's writes reached the Raft log"
    # The owner's retry is still answered from the table: same revision, the value unchanged.
    again, _ = admin.call("key_put", {"key": "cfg/a", "value": "1", "rid": "owner-rid-1"})
    assert again == revision
    _, body = admin.call("key_get", {"key": "cfg/a"})
    assert body["value"] == "1"


def test_bootstrap_after_the_first_costs_no_raft_entry(acl_cluster: Cluster) -> None:
    c = acl_cluster
    admin = c.client(token=acl_bootstrap(c))
    admin.call("key_put", {"key": "sync", "value": "1"})  # the leader has applied the bootstrap by now
    leader = c.wait_leader()
    anon = c.client([leader.api])
    before = proposals(leader)
    for _ in range(20):
        with pytest.raises(Conflict):
            anon.call("acl_bootstrap", {})
    assert proposals(leader) == before


def test_concurrent_guesses_cannot_bypass_the_login_limit(acl_cluster: Cluster) -> None:
    # Before, the limit was checked before an await and counted after: 64 guesses sent at once on one
    # connection all reached the (slow, on purpose) scrypt check.
    c = acl_cluster
    secret = acl_bootstrap(c)
    admin = c.client(token=secret)
    admin.call("acl_role_put", {"name": "ops", "rules": ["service:*=read"]})
    admin.call("acl_user_put", {"name": "ann", "password": "correct horse battery", "roles": ["ops"]})
    node = c.nodes[0]

    async def guesses() -> list[BaseException | tuple[int, Any]]:
        client = Client([node.api], timeout_s=30.0)
        try:
            return await asyncio.gather(
                *(client.call("login", {"name": "ann", "password": f"guess {i}"}) for i in range(64)),
                return_exceptions=True)
        finally:
            await client.close()

    outcomes = asyncio.run(guesses())
    assert not [o for o in outcomes if not isinstance(o, RegistryError)], "a guess logged in"
    checked = [o for o in outcomes if isinstance(o, Unauthenticated)]
    assert 1 <= len(checked) <= 5, f"{len(checked)} guesses reached the password check"
    assert all(isinstance(o, Unauthenticated | LimitExceeded) for o in outcomes)
    log = node.log_path.read_text(errors="replace")
    assert log.count("LOGIN FAILED user=ann") == len(checked)


def test_logins_and_expired_tokens_do_not_pile_up(acl_cluster: Cluster) -> None:
    # Before, expired tokens were never removed and every login added one (up to the 100,000 cap).
    c = acl_cluster
    admin = c.client(token=acl_bootstrap(c))
    admin.call("acl_role_put", {"name": "ops", "rules": ["service:*=read"]})
    admin.call("acl_user_put", {"name": "ann", "password": "correct horse battery", "roles": ["ops"]})
    anon = c.client()
    for _ in range(20):
        anon.call("login", {"name": "ann", "password": "correct horse battery"})
    _, tokens = admin.call("acl_token_list", {})
    assert len([t for t in tokens if t.get("login") == "ann"]) == 16

    _, short = admin.call("acl_token_create", {"roles": ["ops"], "ttl_ms": 1})
    time.sleep(0.05)
    admin.call("acl_token_create", {"roles": ["ops"]})
    _, tokens = admin.call("acl_token_list", {})
    assert short["id"] not in {t["id"] for t in tokens}
