"""Consul's write bodies (service registration, check updates) checked and mapped to our ops.  Pure.

Consul decodes JSON keys case-insensitively and takes snake_case aliases
(``deregister_critical_service_after``); so do we, by comparing keys with
case and underscores folded away.  Fields we cannot honour are refused with
a message, never dropped: a registration that silently lost its HTTP check
would look healthy forever.

What a registration becomes:

* ``Name`` -> service, ``ID`` (default: the name) -> instance id,
  ``Address`` (default: the caller's address, as a Consul agent would use
  its own), ``Port``, ``Tags``, ``Meta``, ``Weights.Passing`` -> weight.
* ``Check.TTL`` (or one ``Checks`` entry with a TTL) -> a lease of that TTL;
  the instance is registered on it, with the check's ``Status`` (Consul's
  default for a TTL check: critical).  A lapsed TTL *removes* the instance
  (our lease semantics), where Consul would mark it critical and remove it
  only after ``DeregisterCriticalServiceAfter``; that field is accepted for
  compatibility and documented as such.
* No check: a passing instance without a lease, as Consul treats a service
  without checks.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from registry.errors import BadRequest, InvalidArgument
from registry.fsm import model
from registry.server.consul.params import parse_duration_s

__all__ = [
    "BODY_BYTES_MAX",
    "CHECK_STATUSES",
    "CheckUpdate",
    "Registration",
    "decode_json",
    "parse_check_update",
    "parse_registration",
]

#: Request bodies: the same 1 MiB as the native API's frame limit.
BODY_BYTES_MAX: Final = 1 << 20

#: Consul's check statuses map one to one onto ours.
CHECK_STATUSES: Final = model.STATUSES

#: Registration fields we understand (folded: lowercase, no underscores).
_REGISTRATION_KEYS: Final = frozenset((
    "name", "id", "address", "port", "tags", "meta", "weights", "check", "checks", "enabletagoverride", "kind",
    "taggedaddresses", "namespace", "partition",
))
_CHECK_KEYS: Final = frozenset((
    "ttl", "deregistercriticalserviceafter", "status", "notes", "name", "checkid", "id", "output",
))
#: Check kinds an agent would run itself: we do not run checks (the regctl agent does).
_RUN_CHECK_KEYS: Final = frozenset(("http", "tcp", "script", "args", "grpc", "h2ping", "udp", "dockercontainerid",
                                    "aliasservice", "aliasnode", "interval", "timeout", "osservice"))


def _fold(key: str) -> str:
    return key.replace("_", "").lower()


def _folded(obj: Mapping[str, Any], what: str, known: frozenset[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in obj.items():
        folded = _fold(key)
        if folded in _RUN_CHECK_KEYS:
            raise BadRequest(
                f"{what}: {key!r} checks are not run by the registry; register with a TTL check and "
                "report its status (or run the regctl agent, which runs HTTP/TCP/command checks)"
            )
        if folded not in known:
            raise BadRequest(f"{what}: unknown field {key[:60]!r}")
        if folded in out:
            raise BadRequest(f"{what}: field {key[:60]!r} given twice")
        out[folded] = value
    return out


def decode_json(body: bytes) -> Any:
    """A request body as JSON; BadRequest (with where it broke) for anything else."""
    if len(body) > BODY_BYTES_MAX:
        raise BadRequest(f"request body is {len(body)} bytes, at most {BODY_BYTES_MAX}")
    try:
        return json.loads(body)
    except UnicodeDecodeError:
        raise BadRequest("request body is not UTF-8") from None
    except json.JSONDecodeError as err:
        raise BadRequest(f"request body is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    except RecursionError:
        raise BadRequest("request body nests too deeply") from None


def _str(what: str, value: Any) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"{what} must be a string, not {type(value).__name__}")
    return value


def _int(what: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRequest(f"{what} must be an integer, not {type(value).__name__}")
    return value


def _str_list(what: str, value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRequest(f"{what} must be a list of strings")
    return value


def _str_map(what: str, value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise BadRequest(f"{what} must be a map of strings to strings")
    return value


def _empty(what: str, value: Any) -> None:
    if value not in (None, "", {}, [], False, "default"):
        raise BadRequest(f"{what} is not supported")


@dataclass(frozen=True, slots=True)
class Registration:
    service: str
    id: str
    address: str
    port: int
    tags: list[str] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)
    weight: int = model.WEIGHT_DEFAULT
    status: str = "passing"
    #: The TTL check's TTL: the instance goes on a lease of this TTL.  None: no check, no lease.
    ttl_ms: int | None = None

    def register_args(self, lease: int | None) -> dict[str, Any]:
        """The native ``register`` op's arguments."""
        return {"service": self.service, "id": self.id, "address": self.address, "port": self.port,
                "tags": self.tags, "meta": self.meta, "weight": self.weight, "status": self.status, "lease": lease}


def _parse_check(obj: Any) -> tuple[int, str]:
    if not isinstance(obj, dict):
        raise BadRequest("Check must be an object")
    check = _folded(obj, "Check", _CHECK_KEYS)
    if check.get("ttl") is None:
        raise BadRequest("Check: only TTL checks are supported (give Check.TTL, e.g. \"10s\")")
    ttl_text = _str("Check.TTL", check["ttl"])
    ttl_ms = round(parse_duration_s(ttl_text) * 1000)
    if not model.LEASE_TTL_MS_MIN <= ttl_ms <= model.LEASE_TTL_MS_MAX:
        raise InvalidArgument(
            f"Check.TTL {ttl_text!r} outside {model.LEASE_TTL_MS_MIN // 1000}s..{model.LEASE_TTL_MS_MAX // 1000}s"
        )
    dcsa = check.get("deregistercriticalserviceafter")
    if dcsa is not None:
        parse_duration_s(_str("Check.DeregisterCriticalServiceAfter", dcsa))  # checked, see module docstring
    status = _str("Check.Status", check.get("status") or "critical")
    if status not in CHECK_STATUSES:
        raise InvalidArgument(f"Check.Status {status[:40]!r} is not one of {', '.join(CHECK_STATUSES)}")
    check_id = check.get("checkid", check.get("id"))
    if check_id is not None:
        _str("Check.CheckID", check_id)
    for name in ("notes", "name", "output"):
        if check.get(name) is not None:
            _str(f"Check.{name}", check[name])
    return ttl_ms, status


def parse_registration(body: Any, default_address: str) -> Registration:
    """``PUT /v1/agent/service/register``'s decoded JSON body."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object (a service definition)")
    reg = _folded(body, "service definition", _REGISTRATION_KEYS)
    if reg.get("name") is None:
        raise BadRequest("missing field 'Name'")
    name = _str("Name", reg["name"])
    iid = _str("ID", reg.get("id") or name)
    address = _str("Address", reg.get("address") or default_address)
    port = _int("Port", reg.get("port", 0))
    if port == 0:
        raise InvalidArgument("Port: a registered instance needs a port in 1..65535")
    tags = _str_list("Tags", reg.get("tags"))
    meta = _str_map("Meta", reg.get("meta"))
    weight = model.WEIGHT_DEFAULT
    weights = reg.get("weights")
    if weights is not None:
        if not isinstance(weights, dict):
            raise BadRequest("Weights must be an object")
        folded = _folded(weights, "Weights", frozenset(("passing", "warning")))
        weight = _int("Weights.Passing", folded.get("passing", model.WEIGHT_DEFAULT))
        if _int("Weights.Warning", folded.get("warning", 1)) != 1:
            raise InvalidArgument("Weights.Warning: instances have one weight here; Warning must be 1")
    for key in ("kind", "taggedaddresses", "namespace", "partition"):
        _empty(key, reg.get(key))
    if not isinstance(reg.get("enabletagoverride", False), bool):
        raise BadRequest("EnableTagOverride must be a boolean")
    checks: list[Any] = []
    if reg.get("check") is not None:
        checks.append(reg["check"])
    if reg.get("checks") is not None:
        if not isinstance(reg["checks"], list):
            raise BadRequest("Checks must be a list")
        checks.extend(reg["checks"])
    if len(checks) > 1:
        raise BadRequest("an instance has one check here (its TTL); give one Check")
    ttl_ms: int | None = None
    status = "passing"
    if checks:
        ttl_ms, status = _parse_check(checks[0])
    return Registration(name, iid, address, port, tags, meta, weight, status, ttl_ms)


@dataclass(frozen=True, slots=True)
class CheckUpdate:
    status: str
    note: str


def parse_check_update(body: Any) -> CheckUpdate:
    """``PUT /v1/agent/check/update/:id``'s body: ``{"Status": ..., "Output": ...}``."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object with Status and Output")
    folded = _folded(body, "check update", frozenset(("status", "output")))
    status = _str("Status", folded.get("status", ""))
    if status not in CHECK_STATUSES:
        raise InvalidArgument(f"Status {status[:40]!r} is not one of {', '.join(CHECK_STATUSES)}")
    return CheckUpdate(status, _str("Output", folded.get("output", "")))
