"""The node side of ACLs: per-request authorization, ACL/intention ops, login, audit.

Where each check happens (see ``registry.fsm.acl`` for rules and the op -> permission map):

* Writes that are state-machine commands carry the caller's token hash in the
  command's ``auth`` field (stamped by ``RegistryAPI.writer`` from
  ``CURRENT_AUTH``); the state machine authorizes them at apply time, so the
  answer is decided at one log position on every replica -- a token revoked
  before the write commits fails everywhere.
* Reads and the other ops (keepalive, membership, backups) are checked here,
  against local state after a read barrier (linearizable) unless the request
  asked for ``consistency: stale``; lease keepalives skip the barrier (they are
  hot, and the lease itself is checked by the leader).
* List ops and watches need only a valid token; their results are filtered to
  what the token may read.

Nothing here runs with ACLs off except the ACL/intention ops themselves
(intentions are useful without ACLs; ACL tables can be prepared before
``--acl`` is turned on).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
import uuid
from collections.abc import Callable
from typing import Any, Final

from registry.errors import BadRequest, Conflict, LimitExceeded, PermissionDenied, RegistryError, Unauthenticated
from registry.fsm import acl
from registry.fsm.commands import validate_command
from registry.fsm.ops import AUDITED_OPS, CLIENT_COMMAND_OPS, NO_BARRIER_OPS, SELF_CHECKED_OPS
from registry.fsm.state import RegistryState
from registry.raft.node import StateHolder
from registry.server.api import CURRENT_AUTH, CURRENT_PEER, RegistryAPI
from registry.server.metrics import NodeMetrics
from registry.server.proposer import Proposer

__all__ = ["AclService", "hash_password", "verify_password", "LoginLimiter"]

audit = logging.getLogger("registry.audit")

SCRYPT_N: Final = 1 << 14
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1
PASSWORD_CHARS_MAX: Final = 1024
LOGIN_TOKEN_TTL_MS: Final = 24 * 3600 * 1000
TOKEN_TTL_MS_MAX: Final = 10 * 365 * 24 * 3600 * 1000


def hash_password(password: str, salt: bytes | None = None) -> str:
    """scrypt, salted: ``scrypt$N$r$p$SALT$DK`` (hex).  Slow on purpose: run it off the loop."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    dk = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=64)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${dk.hex()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        _, n, r, p, salt_hex, dk_hex = stored.split("$")
        dk = hashlib.scrypt(password.encode("utf-8"), salt=bytes.fromhex(salt_hex), n=int(n), r=int(r), p=int(p),
                            dklen=len(dk_hex) // 2)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(dk.hex(), dk_hex)


#: A hash no password matches, verified for unknown users so timing does not reveal who exists.
_DUMMY_HASH: Final = "scrypt$16384$8$1$" + "00" * 16 + "$" + "00" * 64


class LoginLimiter:
    """Login attempts per key (user, client address), pure (the caller passes a clock).

    ``begin`` reserves an attempt *before* the password check: it counts as a
    failure until ``end(ok=True)`` clears the key.  So however many attempts a
    client sends at once, at most ``failures_max`` per ``window_s`` reach the
    (deliberately slow) scrypt check; then the key is blocked for ``block_s``.
    Before, the limit was checked before an await and counted after it, so
    1,024 concurrent guesses on one connection all passed, each a free scrypt.
    At most ``in_flight_max`` attempts per key run at once.
    """

    #: Keys remembered at most; past this the oldest failures are forgotten (a spray of names).
    KEYS_MAX = 100_000

    def __init__(self, failures_max: int = 5, window_s: float = 60.0, block_s: float = 30.0,
                 in_flight_max: int = 2, clock: Callable[[], float] = time.monotonic) -> None:
        self.failures_max = failures_max
        self.window_s = window_s
        self.block_s = block_s
        self.in_flight_max = in_flight_max
        self._clock = clock
        self._failures: dict[str, list[float]] = {}
        self._blocked_until: dict[str, float] = {}
        self._in_flight: dict[str, int] = {}

    def begin(self, keys: list[str]) -> None:
        """Reserve one attempt for every key, or raise LimitExceeded and reserve nothing."""
        now = self._clock()
        for key in keys:
            until = self._blocked_until.get(key)
            if until is not None:
                if now < until:
                    raise LimitExceeded(f"too many failed logins for {key}; retry in {until - now:.0f}s")
                del self._blocked_until[key]
            if self._in_flight.get(key, 0) >= self.in_flight_max:
                raise LimitExceeded(f"{self.in_flight_max} logins for {key} in progress already; retry")
            recent = [t for t in self._failures.get(key, ()) if now - t < self.window_s]
            if len(recent) >= self.failures_max:
                self._block(key, now)
                raise LimitExceeded(f"too many failed logins for {key}; retry in {self.block_s:.0f}s")
        if len(self._failures) >= self.KEYS_MAX:
            self._failures.clear()
        for key in keys:
            recent = [t for t in self._failures.get(key, ()) if now - t < self.window_s]
            recent.append(now)
            self._failures[key] = recent
            self._in_flight[key] = self._in_flight.get(key, 0) + 1

    def end(self, keys: list[str], *, ok: bool) -> None:
        """The attempt ``begin`` reserved is over: a success clears the keys, a failure stays counted."""
        now = self._clock()
        for key in keys:
            left = self._in_flight.get(key, 1) - 1
            if left > 0:
                self._in_flight[key] = left
            else:
                self._in_flight.pop(key, None)
            if ok:
                self._failures.pop(key, None)
            elif len(self._failures.get(key, ())) >= self.failures_max:
                self._block(key, now)

    def _block(self, key: str, now: float) -> None:
        """The block is the penalty: the failures that earned it are forgotten."""
        self._blocked_until[key] = now + self.block_s
        self._failures.pop(key, None)


def _now_ms() -> int:
    return int(time.time() * 1000)


class AclService:
    def __init__(self, api: RegistryAPI, holder: StateHolder, proposer: Proposer, metrics: NodeMetrics,
                 *, enabled: bool) -> None:
        self.enabled = enabled
        self._api = api
        self._holder = holder
        self._proposer = proposer
        self._metrics = metrics
        self.limiter = LoginLimiter()
        w, r = api.writer, api.reader
        handlers = {
            "acl_bootstrap": self.bootstrap,
            "acl_token_create": self.token_create,
            "acl_token_delete": w("acl_token_delete"),
            "acl_token_list": r(lambda s, a: s.acl_token_list(), set()),
            "acl_role_put": w("acl_role_put"),
            "acl_role_delete": w("acl_role_delete"),
            "acl_role_list": r(lambda s, a: s.acl_role_list(), set()),
            "acl_user_put": self.user_put,
            "acl_user_delete": w("acl_user_delete"),
            "acl_user_list": r(lambda s, a: s.acl_user_list(), set()),
            "login": self.login,
            "intention_put": w("intention_put"),
            "intention_delete": w("intention_delete"),
            "intention_default_set": w("intention_default_set"),
            "intention_list": r(lambda s, a: s.intention_list(), set()),
            "intention_check": r(lambda s, a: s.intention_check(_s(a, "source"), _s(a, "destination")),
                                 {"source", "destination"}),
        }
        for op, handler in handlers.items():
            api.add_handler(op, handler)

    # -- per-request enforcement (called by the server only when enabled) --------------------------

    async def before(self, op: str, args: dict[str, Any], principal: str) -> None:
        """Authorize a request before it runs; raises Unauthenticated / PermissionDenied."""
        need = acl.op_permission(op, args)
        if need is None:
            return
        if not principal:
            raise Unauthenticated("a token is required (--token or REGCTL_TOKEN)")
        if op in CLIENT_COMMAND_OPS:
            # Authorized by the state machine at apply time; but a token that does not exist or
            # has expired is refused here, so a stranger's string costs no Raft entry, no
            # replicated refusal and no request-id record.
            await self._authenticate(principal)
            return
        # Self-checked ops are authorized at apply time too; the local check only spares an
        # unprivileged caller's scrypt work and secret generation.
        if op not in NO_BARRIER_OPS and op not in SELF_CHECKED_OPS and args.get("consistency") != "stale":
            await self._proposer.barrier()
        with self._holder.lock:
            self._holder.state.acl_authorize(principal, need[0], need[1], _now_ms())

    async def _authenticate(self, principal: str) -> None:
        """Raise Unauthenticated unless the token exists and has not expired (no permission check).

        A token unknown here may have been created on another node moments ago and not yet
        applied on this one: only after a read barrier is it refused.  Concurrent unknown
        tokens share the barrier of one batch, so a flood of them costs at most one barrier
        entry per batch in flight, and nothing is stored.
        """
        with self._holder.lock:
            known = self._holder.state.acl_token_by_hash(principal) is not None
        if not known:
            await self._proposer.barrier()
        with self._holder.lock:
            self._holder.state.acl_authorize(principal, "read", None, _now_ms())

    def filter_result(self, op: str, body: Any, principal: str) -> Any:
        """Drop the items of a list result the token may not read."""
        if op in ("lease_get", "lease_ttl") and isinstance(body, dict):
            return self._filter_attachments(body, principal)
        if op not in ("service_list", "service_dump", "key_list") or not isinstance(body, list):
            return body
        now = _now_ms()
        with self._holder.lock:
            state = self._holder.state
            if op == "service_list":
                return [i for i in body if state.acl_may(principal, "read", "service:" + i["name"], now)]
            if op == "service_dump":
                return [i for i in body if state.acl_may(principal, "read", "service:" + i["service"]["name"], now)]
            return [i for i in body if state.acl_may(principal, "read", "key:" + i["key"], now)]

    def _filter_attachments(self, body: dict[str, Any], principal: str) -> dict[str, Any]:
        """A lease's instances, keys and locks, each kept only if the token may read it.

        ``read`` on lease alone showed every name attached to any lease (ids count up from 1).
        """
        now = _now_ms()
        out = dict(body)
        with self._holder.lock:
            state = self._holder.state
            if isinstance(body.get("instances"), list):
                out["instances"] = [pair for pair in body["instances"]
                                    if state.acl_may(principal, "read", f"service:{pair[0]}", now)]
            for field in ("keys", "locks"):
                if isinstance(body.get(field), list):
                    out[field] = [name for name in body[field] if state.acl_may(principal, "read", f"key:{name}", now)]
        return out

    def visible(self, state: RegistryState, principal: str, resource: str, now_ms: int) -> bool:
        return state.acl_may(principal, "read", resource, now_ms)

    def recheck(self, principal: str) -> None:
        """Raise Unauthenticated if the token was revoked or expired (ends watch streams)."""
        with self._holder.lock:
            self._holder.state.acl_authorize(principal, "read", None, _now_ms())

    def who(self, principal: str) -> str:
        if not principal:
            return "anonymous"
        with self._holder.lock:
            token = self._holder.state.acl_token_by_hash(principal)
        return f"token:{token['id']}" if token is not None else "token:<unknown>"

    def denied(self, op: str, args: dict[str, Any], principal: str, peer: str, err: RegistryError) -> None:
        need = acl.op_permission(op, args)
        resource = need[1] if need is not None else None
        reason = "unauthenticated" if isinstance(err, Unauthenticated) else "permission_denied"
        self._metrics.acl_denials.labels(reason=reason).inc()
        audit.warning("DENIED who=%s peer=%s op=%s resource=%s at=%d reason=%s: %s", self.who(principal), peer, op,
                      resource, _now_ms(), reason, err.message)

    def succeeded(self, op: str, args: dict[str, Any], principal: str, peer: str) -> None:
        if op in AUDITED_OPS:
            safe = {k: v for k, v in args.items() if k not in ("password", "secret")}
            audit.info("ACL CHANGE who=%s peer=%s op=%s args=%s at=%d", self.who(principal), peer, op, safe,
                       _now_ms())

    # -- handlers --------------------------------------------------------------------------------

    async def _propose(self, command: dict[str, Any], *, stamp: bool) -> dict[str, Any]:
        command["now_ms"] = _now_ms()
        auth = CURRENT_AUTH.get()
        if stamp and auth:
            command["auth"] = auth
        return await self._proposer.write(validate_command(command))

    async def bootstrap(self, args: dict[str, Any]) -> tuple[int, Any]:
        _only(args, set())
        with self._holder.lock:
            done = self._holder.state.acl_bootstrapped
        if done:
            # Known here already: refuse without a Raft entry.  A replica that has not applied the
            # first bootstrap yet proposes, and the state machine refuses that one.
            raise Conflict("ACLs are already bootstrapped: the management token was issued once")
        secret = secrets.token_urlsafe(32)
        token_id = uuid.uuid4().hex[:16]
        # Allowed without a token: the state machine refuses it once bootstrapped (CONFLICT).
        result = await self._propose(
            {"op": "acl_bootstrap", "token_id": token_id, "secret_hash": acl.hash_secret(secret)}, stamp=False
        )
        return int(result["revision"]), {"id": token_id, "secret": secret, "roles": [acl.MANAGEMENT_ROLE]}

    async def _issue(self, roles: list[str], description: str, ttl_ms: int | None,
                     *, stamp: bool, login: str = "") -> tuple[int, Any]:
        secret = secrets.token_urlsafe(32)
        token_id = uuid.uuid4().hex[:16]
        expires_ms = _now_ms() + ttl_ms if ttl_ms is not None else None
        result = await self._propose(
            {"op": "acl_token_create", "token_id": token_id, "secret_hash": acl.hash_secret(secret),
             "roles": roles, "description": description, "expires_ms": expires_ms, "login": login},
            stamp=stamp,
        )
        return int(result["revision"]), {"id": token_id, "secret": secret, "roles": sorted(set(roles)),
                                         "expires_ms": expires_ms}

    async def token_create(self, args: dict[str, Any]) -> tuple[int, Any]:
        _only(args, {"roles", "description", "ttl_ms"})
        roles = args.get("roles", [])
        if not isinstance(roles, list) or not all(isinstance(x, str) for x in roles):
            raise BadRequest("field 'roles' must be a list of strings")
        ttl_ms = args.get("ttl_ms")
        if ttl_ms is not None and (type(ttl_ms) is not int or not 0 < ttl_ms <= TOKEN_TTL_MS_MAX):
            raise BadRequest("field 'ttl_ms' must be a positive integer (at most ten years)")
        return await self._issue(roles, _s(args, "description", ""), ttl_ms, stamp=True)

    async def user_put(self, args: dict[str, Any]) -> tuple[int, Any]:
        _only(args, {"name", "password", "roles"})
        password = _s(args, "password")
        if not 8 <= len(password) <= PASSWORD_CHARS_MAX:
            raise BadRequest(f"password must be 8..{PASSWORD_CHARS_MAX} characters")
        loop = asyncio.get_running_loop()
        # The node hashes (slowly, off the loop); the state machine only stores the hash.
        password_hash = await loop.run_in_executor(None, hash_password, password)
        result = await self._propose(
            {"op": "acl_user_put", "name": _s(args, "name"), "password_hash": password_hash,
             "roles": args.get("roles", [])},
            stamp=True,
        )
        return int(result["revision"]), {"name": args["name"], "created": result.get("created")}

    async def login(self, args: dict[str, Any]) -> tuple[int, Any]:
        _only(args, {"name", "password"})
        name, password = _s(args, "name"), _s(args, "password")
        peer = CURRENT_PEER.get() or "unknown"
        keys = [f"user:{name[:128]}", f"addr:{peer.rpartition(':')[0] or peer}"]
        self.limiter.begin(keys)  # reserved before any await: concurrent guesses cannot all pass
        ok = False
        try:
            await self._proposer.barrier()
            with self._holder.lock:
                found = self._holder.state.acl_user_secret(name)
            stored, roles = found if found is not None else (_DUMMY_HASH, [])
            loop = asyncio.get_running_loop()
            ok = await loop.run_in_executor(None, verify_password, password[:PASSWORD_CHARS_MAX], stored)
            ok = ok and found is not None
        finally:
            self.limiter.end(keys, ok=ok)
        if not ok:
            self._metrics.acl_denials.labels(reason="login_failed").inc()
            audit.warning("LOGIN FAILED user=%s peer=%s at=%d", name[:128], peer, _now_ms())
            raise Unauthenticated("wrong user name or password")
        audit.info("LOGIN user=%s peer=%s at=%d", name, peer, _now_ms())
        return await self._issue(roles, f"login {name}", LOGIN_TOKEN_TTL_MS, stamp=False, login=name)


def _only(args: dict[str, Any], allowed: set[str]) -> None:
    unknown = set(args) - allowed
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(sorted(unknown))}")


def _s(args: dict[str, Any], key: str, default: str | None = None) -> str:
    value = args.get(key, default)
    if not isinstance(value, str):
        raise BadRequest(f"field {key!r} must be a string")
    return value


__all__ += ["PermissionDenied"]
