"""A typed method for every op a client may send, beside the generic ``call``.

``AsyncCalls`` is mixed into ``Client`` and ``SyncCalls`` into ``SyncClient``;
each method names the op's arguments, so a caller (the CLI, an agent, a
script) never spells an op name or an argument key by hand.  Every method
returns ``(revision, body)``: the revision the answer reflects and the
node's answer as sent.  The ops and what they need are listed in
``registry.fsm.ops``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

__all__ = ["AsyncCalls", "SyncCalls"]

Answer = tuple[int, Any]


def _drop_none(**args: Any) -> dict[str, Any]:
    return {key: value for key, value in args.items() if value is not None}


class AsyncCalls:
    """Typed ops over ``self.call`` (see ``Client.call`` for retries, timeouts and errors)."""

    call: Callable[..., Awaitable[Answer]]

    # -- keys and locks -----------------------------------------------------------------

    async def key_put(self, key: str, value: str, *, lease: int | None = None,
                      if_mod_revision: int | None = None) -> Answer:
        return await self.call("key_put", _drop_none(key=key, value=value, lease=lease,
                                                     if_mod_revision=if_mod_revision))

    async def key_get(self, key: str, *, consistency: str = "linearizable") -> Answer:
        return await self.call("key_get", {"key": key, "consistency": consistency})

    async def key_delete(self, key: str, *, if_mod_revision: int | None = None) -> Answer:
        return await self.call("key_delete", _drop_none(key=key, if_mod_revision=if_mod_revision))

    async def key_list(self, prefix: str = "", *, consistency: str = "linearizable") -> Answer:
        return await self.call("key_list", {"prefix": prefix, "consistency": consistency})

    async def lock_acquire(self, name: str, lease: int, holder: str = "") -> Answer:
        return await self.call("lock_acquire", {"name": name, "lease": lease, "holder": holder})

    async def lock_release(self, name: str, lease: int) -> Answer:
        return await self.call("lock_release", {"name": name, "lease": lease})

    async def lock_get(self, name: str, *, consistency: str = "linearizable") -> Answer:
        return await self.call("lock_get", {"name": name, "consistency": consistency})

    # -- services -------------------------------------------------------------------------

    async def service_put(self, name: str, *, meta: dict[str, str] | None = None,
                          tags: Sequence[str] = ()) -> Answer:
        return await self.call("service_put", {"name": name, "meta": dict(meta or {}), "tags": list(tags)})

    async def service_delete(self, name: str) -> Answer:
        return await self.call("service_delete", {"name": name})

    async def instance_get(self, service: str, instance_id: str, *, consistency: str = "linearizable") -> Answer:
        return await self.call("instance_get", {"service": service, "id": instance_id, "consistency": consistency})

    async def service_dump(self, *, consistency: str = "linearizable") -> Answer:
        return await self.call("service_dump", {"consistency": consistency})

    # -- leases ---------------------------------------------------------------------------

    async def lease_get(self, lease: int, *, consistency: str = "linearizable") -> Answer:
        return await self.call("lease_get", {"lease": lease, "consistency": consistency})

    async def lease_list(self, *, consistency: str = "linearizable") -> Answer:
        return await self.call("lease_list", {"consistency": consistency})

    async def lease_ttl(self, lease: int) -> Answer:
        """The lease with its remaining time (``remaining_ms``), asked of the leader."""
        return await self.call("lease_ttl", {"lease": lease})

    # -- ACLs -----------------------------------------------------------------------------

    async def acl_bootstrap(self) -> Answer:
        return await self.call("acl_bootstrap", {})

    async def acl_token_create(self, roles: Sequence[str], *, description: str = "",
                               ttl_ms: int | None = None) -> Answer:
        return await self.call("acl_token_create", _drop_none(roles=list(roles), description=description,
                                                              ttl_ms=ttl_ms))

    async def acl_token_delete(self, token_id: str) -> Answer:
        return await self.call("acl_token_delete", {"token_id": token_id})

    async def acl_token_list(self) -> Answer:
        return await self.call("acl_token_list", {})

    async def acl_role_put(self, name: str, rules: Sequence[str]) -> Answer:
        return await self.call("acl_role_put", {"name": name, "rules": list(rules)})

    async def acl_role_delete(self, name: str) -> Answer:
        return await self.call("acl_role_delete", {"name": name})

    async def acl_role_list(self) -> Answer:
        return await self.call("acl_role_list", {})

    async def acl_user_put(self, name: str, password: str, roles: Sequence[str]) -> Answer:
        return await self.call("acl_user_put", {"name": name, "password": password, "roles": list(roles)})

    async def acl_user_delete(self, name: str) -> Answer:
        return await self.call("acl_user_delete", {"name": name})

    async def acl_user_list(self) -> Answer:
        return await self.call("acl_user_list", {})

    async def login(self, name: str, password: str) -> Answer:
        return await self.call("login", {"name": name, "password": password})

    # -- intentions -----------------------------------------------------------------------

    async def intention_put(self, source: str, destination: str, action: str) -> Answer:
        return await self.call("intention_put", {"source": source, "destination": destination, "action": action})

    async def intention_delete(self, source: str, destination: str) -> Answer:
        return await self.call("intention_delete", {"source": source, "destination": destination})

    async def intention_default_set(self, action: str) -> Answer:
        return await self.call("intention_default_set", {"action": action})

    async def intention_list(self) -> Answer:
        return await self.call("intention_list", {})

    async def intention_check(self, source: str, destination: str) -> Answer:
        return await self.call("intention_check", {"source": source, "destination": destination})

    # -- the cluster ----------------------------------------------------------------------

    async def status(self) -> Answer:
        return await self.call("status", {})

    async def member_list(self) -> Answer:
        return await self.call("member_list", {})

    async def member_add(self, raft: str, api: str | None = None, incarnation: str | None = None) -> Answer:
        """Not retried: a membership change is not idempotent across leaders."""
        return await self.call("member_add", _drop_none(raft=raft, api=api, incarnation=incarnation), retry=False)

    async def member_remove(self, raft: str) -> Answer:
        return await self.call("member_remove", {"raft": raft}, retry=False)

    async def member_transfer_leader(self, raft: str | None = None) -> Answer:
        return await self.call("member_transfer_leader", _drop_none(raft=raft))


class SyncCalls:
    """The same typed ops, blocking (``SyncClient`` runs each on its private loop)."""

    client: AsyncCalls
    _run: Callable[[Awaitable[Any]], Any]

    def _answer(self, awaitable: Awaitable[Answer]) -> Answer:
        answer: Answer = self._run(awaitable)
        return answer

    def key_put(self, key: str, value: str, *, lease: int | None = None,
                if_mod_revision: int | None = None) -> Answer:
        return self._answer(self.client.key_put(key, value, lease=lease, if_mod_revision=if_mod_revision))

    def key_get(self, key: str, *, consistency: str = "linearizable") -> Answer:
        return self._answer(self.client.key_get(key, consistency=consistency))

    def key_delete(self, key: str, *, if_mod_revision: int | None = None) -> Answer:
        return self._answer(self.client.key_delete(key, if_mod_revision=if_mod_revision))

    def key_list(self, prefix: str = "", *, consistency: str = "linearizable") -> Answer:
        return self._answer(self.client.key_list(prefix, consistency=consistency))

    def lock_acquire(self, name: str, lease: int, holder: str = "") -> Answer:
        return self._answer(self.client.lock_acquire(name, lease, holder))

    def lock_release(self, name: str, lease: int) -> Answer:
        return self._answer(self.client.lock_release(name, lease))

    def lock_get(self, name: str, *, consistency: str = "linearizable") -> Answer:
        return self._answer(self.client.lock_get(name, consistency=consistency))

    def service_put(self, name: str, *, meta: dict[str, str] | None = None, tags: Sequence[str] = ()) -> Answer:
        return self._answer(self.client.service_put(name, meta=meta, tags=tags))

    def service_delete(self, name: str) -> Answer:
        return self._answer(self.client.service_delete(name))

    def instance_get(self, service: str, instance_id: str, *, consistency: str = "linearizable") -> Answer:
        return self._answer(self.client.instance_get(service, instance_id, consistency=consistency))

    def service_dump(self, *, consistency: str = "linearizable") -> Answer:
        return self._answer(self.client.service_dump(consistency=consistency))

    def lease_get(self, lease: int, *, consistency: str = "linearizable") -> Answer:
        return self._answer(self.client.lease_get(lease, consistency=consistency))

    def lease_list(self, *, consistency: str = "linearizable") -> Answer:
        return self._answer(self.client.lease_list(consistency=consistency))

    def lease_ttl(self, lease: int) -> Answer:
        return self._answer(self.client.lease_ttl(lease))

    def acl_bootstrap(self) -> Answer:
        return self._answer(self.client.acl_bootstrap())

    def acl_token_create(self, roles: Sequence[str], *, description: str = "", ttl_ms: int | None = None) -> Answer:
        return self._answer(self.client.acl_token_create(roles, description=description, ttl_ms=ttl_ms))

    def acl_token_delete(self, token_id: str) -> Answer:
        return self._answer(self.client.acl_token_delete(token_id))

    def acl_token_list(self) -> Answer:
        return self._answer(self.client.acl_token_list())

    def acl_role_put(self, name: str, rules: Sequence[str]) -> Answer:
        return self._answer(self.client.acl_role_put(name, rules))

    def acl_role_delete(self, name: str) -> Answer:
        return self._answer(self.client.acl_role_delete(name))

    def acl_role_list(self) -> Answer:
        return self._answer(self.client.acl_role_list())

    def acl_user_put(self, name: str, password: str, roles: Sequence[str]) -> Answer:
        return self._answer(self.client.acl_user_put(name, password, roles))

    def acl_user_delete(self, name: str) -> Answer:
        return self._answer(self.client.acl_user_delete(name))

    def acl_user_list(self) -> Answer:
        return self._answer(self.client.acl_user_list())

    def login(self, name: str, password: str) -> Answer:
        return self._answer(self.client.login(name, password))

    def intention_put(self, source: str, destination: str, action: str) -> Answer:
        return self._answer(self.client.intention_put(source, destination, action))

    def intention_delete(self, source: str, destination: str) -> Answer:
        return self._answer(self.client.intention_delete(source, destination))

    def intention_default_set(self, action: str) -> Answer:
        return self._answer(self.client.intention_default_set(action))

    def intention_list(self) -> Answer:
        return self._answer(self.client.intention_list())

    def intention_check(self, source: str, destination: str) -> Answer:
        return self._answer(self.client.intention_check(source, destination))

    def status(self) -> Answer:
        return self._answer(self.client.status())

    def member_list(self) -> Answer:
        return self._answer(self.client.member_list())

    def member_add(self, raft: str, api: str | None = None, incarnation: str | None = None) -> Answer:
        return self._answer(self.client.member_add(raft, api, incarnation))

    def member_remove(self, raft: str) -> Answer:
        return self._answer(self.client.member_remove(raft))

    def member_transfer_leader(self, raft: str | None = None) -> Answer:
        return self._answer(self.client.member_transfer_leader(raft))
