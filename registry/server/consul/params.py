"""Query parameters of the Consul HTTP API: parsed and checked, no I/O.

Every endpoint names the parameters it understands (``Endpoint.accepts``);
anything else is refused with ``BadRequest`` rather than silently ignored,
because an ignored ``filter`` or ``near`` would answer a different question
than the one asked.  Parameters Consul has and we deliberately do not
support get a message saying so (``UNSUPPORTED``).

Blocking-query parameters follow Consul: ``index`` is an unsigned integer,
``wait`` a Go duration (``time.ParseDuration`` syntax), default 5 minutes,
capped at 10; the server adds up to ``wait / 16`` of jitter so that many
clients woken together do not come back together.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from registry.errors import BadRequest, InvalidArgument

__all__ = [
    "BLOCKING_PARAMS",
    "COMMON_PARAMS",
    "INDEX_MAX",
    "Query",
    "TAGS_PER_QUERY_MAX",
    "UNSUPPORTED",
    "WAIT_DEFAULT_S",
    "WAIT_JITTER_DIVISOR",
    "WAIT_MAX_S",
    "parse_duration_s",
    "parse_flag",
    "parse_query",
]

#: Consul's defaults for a blocking query's ``wait``: 5 minutes, at most 10.
WAIT_DEFAULT_S: Final = 300.0
WAIT_MAX_S: Final = 600.0
#: Jitter added to a wait is up to ``wait / WAIT_JITTER_DIVISOR`` (Consul uses 16).
WAIT_JITTER_DIVISOR: Final = 16
#: ``index`` is a uint64 in Consul; ours are revisions, which fit a signed 64-bit int.
INDEX_MAX: Final = 2**63 - 1
#: ``tag`` may repeat; more than an instance can carry (model.TAGS_MAX) can never match.
TAGS_PER_QUERY_MAX: Final = 64
#: Longest ``wait`` string looked at: a Go duration of any sane value is far shorter.
_DURATION_CHARS_MAX: Final = 64

#: Parameters Consul has that we do not serve, with why: refused, never ignored.
UNSUPPORTED: Final[Mapping[str, str]] = {
    "filter": "filter expressions are not supported; select by ?tag= and ?passing instead",
    "near": "sorting by network distance (?near) is not supported: there are no coordinates",
    "node-meta": "node metadata filters (?node-meta) are not supported: there is one synthetic node",
    "peer": "cluster peering (?peer) is not supported",
    "sg": "sameness groups (?sg) are not supported",
    "merge-central-config": "central service config is not supported",
    "acquire": "KV sessions (?acquire) are not supported; use regctl locks",
    "release": "KV sessions (?release) are not supported; use regctl locks",
}

#: Accepted by every endpoint.
COMMON_PARAMS: Final = frozenset(("dc", "token", "ns", "partition", "pretty"))
#: Accepted by every read that can block.
BLOCKING_PARAMS: Final = frozenset(("index", "wait", "stale", "consistent", "cached"))

# Go's time.ParseDuration: an optional sign, then one or more <decimal><unit>.
_DURATION_PART: Final = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_S: Final[Mapping[str, float]] = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0,
}


def parse_duration_s(text: str) -> float:
    """A Go duration ("90s", "1m30s", "1.5h", "250ms") in seconds; "0" alone is zero, as in Go."""
    if len(text) > _DURATION_CHARS_MAX:
        raise InvalidArgument(f"duration longer than {_DURATION_CHARS_MAX} chars")
    body = text[1:] if text[:1] in ("+", "-") else text
    if body == "0":
        return 0.0
    if not body:
        raise InvalidArgument(f"invalid duration {text!r}: expected e.g. 10s, 1m30s, 250ms")
    total = 0.0
    pos = 0
    while pos < len(body):
        match = _DURATION_PART.match(body, pos)
        if match is None:
            raise InvalidArgument(f"invalid duration {text!r}: expected e.g. 10s, 1m30s, 250ms")
        total += float(match.group(1)) * _UNIT_S[match.group(2)]
        pos = match.end()
    return -total if text.startswith("-") else total


def parse_flag(name: str, values: Sequence[str]) -> bool:
    """A flag parameter: present bare (``?stale``) or with a boolean value, as Consul's clients send it."""
    if not values:
        return False
    value = values[-1].lower()
    if value in ("", "true", "1"):
        return True
    if value in ("false", "0"):
        return False
    raise InvalidArgument(f"?{name}={values[-1][:40]!r}: expected no value, true or false")


@dataclass(frozen=True, slots=True)
class Query:
    """The parsed parameters of one request."""

    #: Blocking: the index the client holds (0: answer at once) and how long to wait.
    index: int = 0
    wait_s: float = WAIT_DEFAULT_S
    #: Served from this node's state without a read barrier (?stale, ?cached).
    stale: bool = False
    #: ?tag=, every one required; ?passing: only instances whose status is passing.
    tags: tuple[str, ...] = ()
    passing: bool = False
    #: The token from ?token= (headers are the shell's business).
    token: str | None = None


def parse_query(
    params: Mapping[str, Sequence[str]], accepts: frozenset[str], *, datacenter: str
) -> tuple[Query, dict[str, list[str]]]:
    """Check ``params`` (name -> every value given) against what an endpoint ``accepts``.

    Returns the common parameters parsed and the endpoint's own ones (those in
    ``accepts`` outside the common and blocking sets) untouched for the caller.
    """
    for name in params:
        if name in UNSUPPORTED:
            raise BadRequest(f"?{name}: {UNSUPPORTED[name]}")
        if name not in accepts and name not in COMMON_PARAMS:
            raise BadRequest(f"unsupported query parameter ?{name[:40]} for this endpoint")

    def last(name: str) -> str | None:
        values = params.get(name)
        return values[-1] if values else None

    dc = last("dc")
    if dc not in (None, "", datacenter):
        raise BadRequest(f"?dc={dc[:40]!r}: this registry serves only datacenter {datacenter!r}")
    for name in ("ns", "partition"):
        value = last(name)
        if value not in (None, "", "default"):
            raise BadRequest(f"?{name}={value[:40]!r}: only the default {name} exists here")
    index = 0
    raw_index = last("index")
    if raw_index is not None:
        # Digits only: int() would also take "+1", " 1" and "1_0".
        if not raw_index.isascii() or not raw_index.isdigit() or len(raw_index) > 19 or int(raw_index) > INDEX_MAX:
            raise BadRequest(f"?index={raw_index[:40]!r}: must be an integer from 0 to {INDEX_MAX}")
        index = int(raw_index)
    wait_s = WAIT_DEFAULT_S
    raw_wait = last("wait")
    if raw_wait is not None:
        wait_s = parse_duration_s(raw_wait)
        if wait_s < 0:
            raise InvalidArgument(f"?wait={raw_wait!r}: must not be negative")
        wait_s = min(wait_s, WAIT_MAX_S)
    stale = parse_flag("stale", params.get("stale", ())) or parse_flag("cached", params.get("cached", ()))
    if stale and parse_flag("consistent", params.get("consistent", ())):
        raise BadRequest("?stale and ?consistent ask for opposite things; give one")
    tags = tuple(params.get("tag", ()))
    if len(tags) > TAGS_PER_QUERY_MAX:
        raise InvalidArgument(f"at most {TAGS_PER_QUERY_MAX} ?tag= per query")
    passing = parse_flag("passing", params.get("passing", ()))
    token = last("token") or None
    own = {k: list(v) for k, v in params.items() if k not in COMMON_PARAMS and k not in BLOCKING_PARAMS
           and k not in ("tag", "passing")}
    return Query(index, wait_s, stale, tags, passing, token), own
