"""ACLs: rule syntax, the pure authorization evaluator, and op -> permission mapping.

Pure: no I/O, no clock (``now_ms`` is an argument), so the state machine can
call :func:`authorize` at apply time and every replica reaches the same answer.

Resources and verbs
===================

A rule grants ``verbs`` on one ``resource``:

* ``service:PATTERN`` -- services whose name matches the glob ``PATTERN``
  (:func:`fnmatch.fnmatchcase`: ``web*``, ``db-?``, ``*``);
* ``key:PREFIX`` -- keys and locks whose name starts with ``PREFIX``
  (``key:`` alone is every key);
* ``lease`` -- granting, keeping alive, revoking and reading leases.  Leases
  are not owned by a service, so they get a neutral resource of their own: a
  token that may register instances with a lease needs ``write`` on ``lease``
  as well as ``register`` on the service;
* ``acl`` -- tokens, roles, users; ``cluster`` -- membership and backups;
  ``intention`` -- service-to-service intentions;
* ``*`` -- everything (the builtin ``management`` role).

Verbs are ``read``, ``write``, ``register`` and ``admin``; a rule grants
exactly the verbs it lists, except that ``admin`` grants every verb on its
resource.  Anything not granted is denied (default deny).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from fnmatch import fnmatchcase
from typing import Any, Final

from registry.errors import InvalidArgument, InvalidName, PermissionDenied, Unauthenticated
from registry.fsm.ops import op_permission

__all__ = [
    "VERBS",
    "MANAGEMENT_ROLE",
    "authorize",
    "authenticate",
    "hash_secret",
    "parse_rule",
    "op_permission",
    "event_resource",
    "resource_matches",
]

VERBS: Final = ("read", "write", "register", "admin")
#: The builtin role of the bootstrap token: every verb on everything.
MANAGEMENT_ROLE: Final = "management"
MANAGEMENT_RULES: Final = ({"resource": "*", "verbs": ["admin"]},)
FIXED_RESOURCES: Final = frozenset(("acl", "cluster", "intention", "lease", "*"))
RULES_PER_ROLE_MAX: Final = 64
ROLES_PER_PRINCIPAL_MAX: Final = 16
DESCRIPTION_CHARS_MAX: Final = 256
PATTERN_CHARS_MAX: Final = 512
INTENTION_ACTIONS: Final = ("allow", "deny")
ACL_EVENT_KINDS: Final = frozenset(("acl_token", "acl_role", "acl_user"))

_HASH_RE: Final = re.compile(r"[0-9a-f]{64}")
_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_PW_HASH_RE: Final = re.compile(r"scrypt\$[0-9]+\$[0-9]+\$[0-9]+\$[0-9a-f]{32}\$[0-9a-f]{128}")


def hash_secret(secret: str) -> str:
    """The stored form of a token secret: secrets are 32 random bytes, so a fast hash is right.

    Any ``str`` hashes, even one with lone surrogates: aiohttp hands over a header's
    undecodable bytes as surrogates, and a Bearer token of them must be refused as unknown
    (401), not crash the request (500; found by tests/fuzz/test_fuzz_http.py).
    """
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


# -- command field checks (signature ``(field, value) -> value`` like registry.fsm.model) ----------


def check_id(field: str, value: str) -> str:
    if not _ID_RE.fullmatch(value):
        raise InvalidName(f"{field} must match [A-Za-z0-9][A-Za-z0-9._-]* (1..128 chars), got {value[:80]!r}")
    return value


def check_hash(field: str, value: str | None) -> str | None:
    if value is not None and not _HASH_RE.fullmatch(value):
        raise InvalidArgument(f"{field} must be a lowercase hex sha256 (64 chars)")
    return value


def check_password_hash(field: str, value: str) -> str:
    if not _PW_HASH_RE.fullmatch(value):
        raise InvalidArgument(f"{field} must be an scrypt hash made by the node")
    return value


def check_roles(field: str, value: list[str]) -> list[str]:
    out = sorted(set(value))
    if len(out) > ROLES_PER_PRINCIPAL_MAX:
        raise InvalidArgument(f"{field}: at most {ROLES_PER_PRINCIPAL_MAX} roles")
    for name in out:
        check_id(field, name)
    return out


def check_login(field: str, value: str) -> str:
    """The user a login token was issued to ("" for tokens made otherwise)."""
    return value if value == "" else check_id(field, value)


def check_description(field: str, value: str) -> str:
    if len(value) > DESCRIPTION_CHARS_MAX:
        raise InvalidArgument(f"{field} must be at most {DESCRIPTION_CHARS_MAX} characters")
    return value


def check_expires(field: str, value: int | None) -> int | None:
    if value is not None and not 0 < value < 2**63:
        raise InvalidArgument(f"{field} must be a positive epoch-ms timestamp")
    return value


def check_action(field: str, value: str) -> str:
    if value not in INTENTION_ACTIONS:
        raise InvalidArgument(f"{field} must be 'allow' or 'deny', got {value[:40]!r}")
    return value


def parse_rule(text: str) -> dict[str, Any]:
    """``RESOURCE=VERB[,VERB...]`` -> ``{"resource", "verbs"}`` (verbs sorted, unique)."""
    resource, sep, verbs_text = text.rpartition("=")
    if not sep or not resource:
        raise InvalidArgument(f"rule must be RESOURCE=VERB[,VERB...], got {text[:80]!r}")
    if len(resource) > PATTERN_CHARS_MAX:
        raise InvalidArgument(f"rule resource longer than {PATTERN_CHARS_MAX} characters")
    kind, colon, _ = resource.partition(":")
    if not (colon and kind in ("service", "key")) and resource not in FIXED_RESOURCES:
        raise InvalidArgument(
            f"rule resource must be service:PATTERN, key:PREFIX, acl, cluster, intention, lease or *, "
            f"got {resource[:80]!r}"
        )
    verbs = sorted({v.strip() for v in verbs_text.split(",") if v.strip()})
    if not verbs or any(v not in VERBS for v in verbs):
        raise InvalidArgument(f"rule verbs must be some of {', '.join(VERBS)}, got {verbs_text[:80]!r}")
    return {"resource": resource, "verbs": verbs}


def format_rule(rule: Mapping[str, Any]) -> str:
    return f"{rule['resource']}={','.join(rule['verbs'])}"


def check_rules(field: str, value: list[str]) -> list[str]:
    """Rules in their text form, canonicalised (so validation stays a fixed point)."""
    if len(value) > RULES_PER_ROLE_MAX:
        raise InvalidArgument(f"{field}: at most {RULES_PER_ROLE_MAX} rules")
    return [format_rule(parse_rule(text)) for text in value]


# -- the evaluator --------------------------------------------------------------------------------


def resource_matches(granted: str, resource: str) -> bool:
    """Whether a rule on ``granted`` covers the concrete ``resource``."""
    if granted == "*":
        return True
    g_kind, g_colon, g_pattern = granted.partition(":")
    r_kind, r_colon, r_name = resource.partition(":")
    if not g_colon or not r_colon:
        return granted == resource
    if g_kind != r_kind:
        return False
    if g_kind == "service":
        return fnmatchcase(r_name, g_pattern)
    return r_name.startswith(g_pattern)


def authenticate(tokens_by_hash: Mapping[str, Mapping[str, Any]], secret_hash: str | None,
                 now_ms: int | None) -> Mapping[str, Any]:
    """The token record for ``secret_hash``; Unauthenticated if missing, unknown or expired."""
    if not secret_hash:
        raise Unauthenticated("a token is required (--token or REGCTL_TOKEN)")
    token = tokens_by_hash.get(secret_hash)
    if token is None:
        raise Unauthenticated("unknown or revoked token")
    expires = token.get("expires_ms")
    if expires is not None and now_ms is not None and now_ms >= expires:
        raise Unauthenticated(f"token {token['id']} expired")
    return token


def token_rules(roles: Mapping[str, Mapping[str, Any]], token: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    rules: list[Mapping[str, Any]] = []
    for name in token["roles"]:
        if name == MANAGEMENT_ROLE:
            rules.extend(MANAGEMENT_RULES)
        else:
            role = roles.get(name)
            if role is not None:
                rules.extend(role["rules"])
    return rules


def allowed(rules: list[Mapping[str, Any]], verb: str, resource: str) -> bool:
    for rule in rules:
        if (verb in rule["verbs"] or "admin" in rule["verbs"]) and resource_matches(rule["resource"], resource):
            return True
    return False


def authorize(tokens_by_hash: Mapping[str, Mapping[str, Any]], roles: Mapping[str, Mapping[str, Any]],
              secret_hash: str | None, verb: str, resource: str | None, now_ms: int | None) -> Mapping[str, Any]:
    """Return the token if it may ``verb`` on ``resource``; raise Unauthenticated / PermissionDenied.

    ``resource=None`` only authenticates (the op filters its result per item).
    """
    token = authenticate(tokens_by_hash, secret_hash, now_ms)
    if resource is None:
        return token
    if not allowed(token_rules(roles, token), verb, resource):
        raise PermissionDenied(f"token {token['id']} may not {verb} {resource}")
    return token


# -- op -> (verb, resource) -----------------------------------------------------------------------

# op -> (verb, resource): ``registry.fsm.ops.OP_TABLE`` holds every op's permission; the
# names below are re-exported from it for the modules that ask this one.


def event_resource(event: Mapping[str, Any]) -> str:
    """The resource a watch event belongs to (reading it needs ``read`` on it)."""
    kind = event.get("kind")
    if kind in ("service", "instance"):
        return "service:" + str(event.get("service"))
    if kind in ("key", "lock"):
        return "key:" + str(event.get("id"))
    if kind == "lease":
        return "lease"
    if kind == "intention":
        return "intention"
    if kind in ACL_EVENT_KINDS:
        return "acl"
    return "cluster"
