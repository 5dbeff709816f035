"""One error hierarchy for the whole registry, mapped to stable wire codes.

::

    RegistryError (UNKNOWN)
    ├── BadRequest (BAD_REQUEST)           malformed request: wrong types, missing fields
    │   ├── UnknownOp (UNKNOWN_OP)          op name the node does not serve
    │   ├── InvalidName (INVALID_NAME)      name outside the allowed pattern or length
    │   ├── InvalidArgument (INVALID_ARGUMENT)  value out of range (TTL, weight, port ...)
    │   └── LimitExceeded (LIMIT_EXCEEDED)  a named limit (instances per service, ...) is hit
    ├── ProtocolError (PROTOCOL_ERROR)     the byte stream itself is broken
    │   ├── FrameTooLarge (FRAME_TOO_LARGE)
    │   └── VersionMismatch (VERSION_MISMATCH)
    ├── NotFound (NOT_FOUND)               service / instance / lease does not exist
    ├── Conflict (CONFLICT)                compare-and-set guard failed, lock held
    ├── Unauthenticated (UNAUTHENTICATED)  missing or unknown token
    ├── PermissionDenied (PERMISSION_DENIED)
    ├── Unavailable (UNAVAILABLE)          retry elsewhere: no leader, no quorum, shutting down
    │   ├── NotLeader (NOT_LEADER)          carries a hint: the leader's API address if known
    │   └── Timeout (TIMEOUT)               outcome unknown: the write may or may not apply
    └── Internal (INTERNAL)                a bug; never bad input

Codes are part of the wire protocol and the CLI's documented exit behaviour:
never renumber or rename one; add new ones instead.  A code a peer does not
know maps back to ``RegistryError`` with code ``UNKNOWN`` so old clients keep
working against new servers.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "RegistryError",
    "BadRequest",
    "UnknownOp",
    "InvalidName",
    "InvalidArgument",
    "LimitExceeded",
    "ProtocolError",
    "FrameTooLarge",
    "VersionMismatch",
    "NotFound",
    "Conflict",
    "Unauthenticated",
    "PermissionDenied",
    "Unavailable",
    "NotLeader",
    "Timeout",
    "Internal",
    "error_from_wire",
    "error_to_wire",
    "CODES",
]


class RegistryError(Exception):
    """Base of every error the registry reports to a client."""

    code = "UNKNOWN"
    #: Whether retrying the same request on another node can succeed.
    retryable = False

    def __init__(self, message: str = "", *, hint: str | None = None) -> None:
        super().__init__(message or self.code)
        self.message = message or self.code
        self.hint = hint

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class BadRequest(RegistryError):
    code = "BAD_REQUEST"


class UnknownOp(BadRequest):
    code = "UNKNOWN_OP"


class InvalidName(BadRequest):
    code = "INVALID_NAME"


class InvalidArgument(BadRequest):
    code = "INVALID_ARGUMENT"


class LimitExceeded(BadRequest):
    code = "LIMIT_EXCEEDED"


class ProtocolError(RegistryError):
    code = "PROTOCOL_ERROR"


class FrameTooLarge(ProtocolError):
    code = "FRAME_TOO_LARGE"


class VersionMismatch(ProtocolError):
    code = "VERSION_MISMATCH"


class NotFound(RegistryError):
    code = "NOT_FOUND"


class Conflict(RegistryError):
    code = "CONFLICT"


class Unauthenticated(RegistryError):
    code = "UNAUTHENTICATED"


class PermissionDenied(RegistryError):
    code = "PERMISSION_DENIED"


class Unavailable(RegistryError):
    code = "UNAVAILABLE"
    retryable = True


class NotLeader(Unavailable):
    code = "NOT_LEADER"


class Timeout(Unavailable):
    code = "TIMEOUT"


class Internal(RegistryError):
    code = "INTERNAL"


def _all_subclasses(cls: type[RegistryError]) -> list[type[RegistryError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all_subclasses(sub))
    return out


#: The one table from wire code to class.
CODES: dict[str, type[RegistryError]] = {c.code: c for c in _all_subclasses(RegistryError)}


def error_to_wire(err: RegistryError) -> dict[str, Any]:
    """Encode an error as the ``err`` field of a response."""
    out: dict[str, Any] = {"code": err.code, "message": err.message}
    if err.hint is not None:
        out["hint"] = err.hint
    return out


def error_from_wire(obj: Any) -> RegistryError:
    """Decode the ``err`` field of a response; unknown codes become ``RegistryError``."""
    if not isinstance(obj, dict):
        return ProtocolError(f"malformed error object: {obj!r:.100}")
    code = obj.get("code")
    message = obj.get("message")
    hint = obj.get("hint")
    cls = CODES.get(code, RegistryError) if isinstance(code, str) else RegistryError
    err = cls(str(message) if message is not None else str(code), hint=hint if isinstance(hint, str) else None)
    if cls is RegistryError and isinstance(code, str):
        # Keep the unknown code visible to the user rather than hiding it.
        err.message = f"{code}: {err.message}"
    return err
