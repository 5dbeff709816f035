"""Limits, field validators and record shapes of the registry state machine.

Everything here is pure: validators take ``(field, value)`` and either return
the (normalised) value or raise a :mod:`registry.errors` ``BadRequest``
subclass whose message names the field.  Type checks (is it a str at all?)
happen in :mod:`registry.fsm.commands`; validators here assume the Python type is
already right and check the *value*.

Error classes, consistently:

* ``InvalidName``      a name/identifier (service, instance id, meta key, KV key,
                       lock name) outside its pattern or length;
* ``InvalidArgument``  any other value outside its range or shape, including
                       per-request size limits (meta entries, tags, value bytes);
* ``LimitExceeded``    raised by the state machine only, when a *capacity* limit
                       of the cluster state (services, instances per service,
                       leases, keys) is hit -- i.e. the same request could
                       succeed against a smaller state.

Records are plain dicts (msgpack-able) built only by the ``*_record``
functions below, so their key order -- and hence snapshot bytes -- is fixed.
Records are immutable after creation: a change builds a new dict.
"""

from __future__ import annotations

import re
from typing import Any, Final

from registry.errors import BadRequest, InvalidArgument, InvalidName

__all__ = [
    "Record",
    "INT_MAX",
    "NAME_CHARS_MAX",
    "ADDRESS_CHARS_MAX",
    "PORT_MIN",
    "PORT_MAX",
    "WEIGHT_MIN",
    "WEIGHT_MAX",
    "WEIGHT_DEFAULT",
    "META_KEYS_MAX",
    "META_VALUE_CHARS_MAX",
    "TAGS_MAX",
    "TAG_CHARS_MAX",
    "STATUSES",
    "STATUS_DEFAULT",
    "NOTE_CHARS_MAX",
    "LEASE_TTL_MS_MIN",
    "LEASE_TTL_MS_MAX",
    "LEASE_EXPIRE_BATCH_MAX",
    "LEASE_KEEPALIVE_IDS_MAX",
    "LEASE_TTL_BITS",
    "KEY_CHARS_MAX",
    "VALUE_BYTES_MAX",
    "HOLDER_CHARS_MAX",
    "RID_CHARS_MAX",
    "INSTANCES_PER_SERVICE_MAX",
    "SERVICES_MAX",
    "LEASES_MAX",
    "KEYS_MAX",
    "DEDUP_ENTRIES_MAX",
    "check_name",
    "check_address",
    "check_port",
    "check_weight",
    "check_meta",
    "check_tags",
    "check_status",
    "check_note",
    "check_ttl_ms",
    "check_lease_id",
    "check_optional_lease_id",
    "check_lease_list",
    "check_guard",
    "check_epoch",
    "check_key",
    "check_key_prefix",
    "check_value",
    "check_holder",
    "check_rid",
    "check_now_ms",
    "service_record",
    "instance_record",
    "lease_record",
    "lease_pack",
    "lease_ttl_ms",
    "lease_granted_ms",
    "key_record",
    "lock_record",
    "parse_service_record",
    "parse_instance_record",
    "parse_lease_record",
    "parse_key_record",
    "parse_lock_record",
]

#: A record or event: a plain, msgpack-able dict.
Record = dict[str, Any]

# ---------------------------------------------------------------------------
# Limits.  Units are last in the names; each says why it has its value.
# ---------------------------------------------------------------------------

#: Largest integer accepted anywhere: msgpack and most client languages carry
#: integers as signed 64-bit; a bigger Python int would make the snapshot
#: unserialisable on every replica at once.
INT_MAX: Final = 2**63 - 1

#: Service names, instance ids and meta keys: long enough for DNS labels plus
#: namespacing, short enough to keep index keys and event payloads small.
NAME_CHARS_MAX: Final = 128

#: Instance address: a DNS name is at most 253 chars; 255 leaves room for an
#: IPv6 literal with zone id.
ADDRESS_CHARS_MAX: Final = 255

#: TCP/UDP port range; port 0 means "any" and is never a reachable endpoint.
PORT_MIN: Final = 1
PORT_MAX: Final = 65535

#: Load-balancing weight: 0 would mean "never pick" (deregister instead); 1000
#: gives 0.1% resolution, plenty for weighted round-robin.
WEIGHT_MIN: Final = 1
WEIGHT_MAX: Final = 1000
WEIGHT_DEFAULT: Final = 1

#: Meta entries per record: metadata is for small routing hints, not storage;
#: bounding it bounds the size of every instance record and event.
META_KEYS_MAX: Final = 64
#: Meta value length: same reason as META_KEYS_MAX.
META_VALUE_CHARS_MAX: Final = 1024

#: Tags per record and tag length.  Tools keep whole routing rules in tags (Traefik:
#: ``traefik.http.routers.x.rule=Host(`a.test`) && PathPrefix(`/b`)``), so a tag may hold
#: spaces and be long; 64 x 512 chars still bounds a record's tags to 32 KiB (times 4 for
#: non-ASCII UTF-8), far inside one Raft entry and one watch message.
TAGS_MAX: Final = 64
TAG_CHARS_MAX: Final = 512

#: Health statuses, from best to worst.
STATUSES: Final = ("passing", "warning", "critical")
STATUS_DEFAULT: Final = "passing"

#: set_status note (health-check output): kept in the instance record of the
#: last status change and sent in its event, so it is bounded to keep both small.
NOTE_CHARS_MAX: Final = 1024

#: Lease TTL: below 1 s the leader's expiry loop and Raft commit latency would
#: expire healthy leases; above one day a dead client holds names for too long.
LEASE_TTL_MS_MIN: Final = 1000
LEASE_TTL_MS_MAX: Final = 86_400_000

#: Leases per lease_expire command: bounds the size of one Raft entry and the
#: time one apply holds the state machine; the leader batches beyond it.
LEASE_EXPIRE_BATCH_MAX: Final = 10_000

#: Lease ids per ``lease_keepalive_batch`` request: 10k ids pack to <= 90 KiB
#: and the answer (a TTL per id) to <= 50 KiB, well inside a 1 MiB frame, and
#: renewing them holds the leader's loop for a few ms at most.
LEASE_KEEPALIVE_IDS_MAX: Final = 10_000

#: A live lease is stored in the state as one int, ``granted_ms << 27 | ttl_ms``
#: (see ``lease_pack``), not a dict: ~36 bytes instead of ~270 per lease on
#: every node.  27 bits hold any TTL up to LEASE_TTL_MS_MAX.
LEASE_TTL_BITS: Final = 27
_LEASE_TTL_MASK: Final = (1 << LEASE_TTL_BITS) - 1
assert LEASE_TTL_MS_MAX <= _LEASE_TTL_MASK

#: KV keys and lock names: room for path-like hierarchical keys.
KEY_CHARS_MAX: Final = 512
#: KV value size in UTF-8 bytes: 64 KiB keeps one Raft entry (and the
#: replication of it) far below the frame limit.
VALUE_BYTES_MAX: Final = 64 * 1024

#: Lock holder description (free text such as "host-3 pid 4711").
HOLDER_CHARS_MAX: Final = 256

#: Client request id: a UUID is 36 chars; 64 leaves room for a client prefix
#: while keeping the dedup table's memory bounded.
RID_CHARS_MAX: Final = 64

#: Capacity limits of the replicated state (LimitExceeded).  They bound how many
#: records there are, not memory in total: 1M keys of 64 KiB is 64 GiB on every
#: replica.  The total is bounded by ``StateLimits.state_bytes_max`` (limits.py);
#: a leader that accepted unbounded growth would take the whole cluster down at once.
INSTANCES_PER_SERVICE_MAX: Final = 100_000
SERVICES_MAX: Final = 100_000
LEASES_MAX: Final = 1_000_000
KEYS_MAX: Final = 1_000_000

#: Remembered client request ids: enough for ~10 s of retries at 10k cmd/s;
#: FIFO-evicted so the table is deterministic and bounded.
DEDUP_ENTRIES_MAX: Final = 100_000

# fullmatch, never match+$: "$" would accept a trailing newline.
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

# Longest user value quoted back in an error message, so errors stay small.
_QUOTE_CHARS_MAX: Final = 80


def _q(value: Any) -> str:
    """Quote a user value for an error message, truncated."""
    text = repr(value)
    if len(text) > _QUOTE_CHARS_MAX:
        text = text[: _QUOTE_CHARS_MAX - 3] + "..."
    return text


def _is_token(value: str) -> bool:
    """Printable and free of whitespace.

    ``str.isprintable`` is False for every whitespace character except the
    ASCII space (they are all categories Cc/Z*), and for lone surrogates (Cs),
    which could not be UTF-8 encoded into a snapshot.
    """
    return value.isprintable() and " " not in value


def _encodable(value: str) -> bool:
    """Can be UTF-8 encoded (no lone surrogates), as msgpack requires."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_int_range(field: str, value: int, low: int, high: int, what: str = "") -> int:
    if not low <= value <= high:
        raise InvalidArgument(f"field {field!r}: {what or 'value'} {_q(value)} outside {low}..{high}")
    return value


# ---------------------------------------------------------------------------
# Field validators: (field name, value of the right Python type) -> value.
# ---------------------------------------------------------------------------


def check_name(field: str, value: str) -> str:
    """Service name, instance id or meta key."""
    # Length first so a huge string never reaches the regex.
    if not 0 < len(value) <= NAME_CHARS_MAX or _NAME_RE.fullmatch(value) is None:
        raise InvalidName(
            f"field {field!r}: {_q(value)} is not a valid name "
            f"(1..{NAME_CHARS_MAX} chars of [A-Za-z0-9._-], starting with a letter or digit)"
        )
    return value


def check_address(field: str, value: str) -> str:
    if not 0 < len(value) <= ADDRESS_CHARS_MAX or not _is_token(value):
        raise InvalidArgument(
            f"field {field!r}: {_q(value)} is not a valid address "
            f"(1..{ADDRESS_CHARS_MAX} printable chars, no whitespace)"
        )
    return value


def check_port(field: str, value: int) -> int:
    return _check_int_range(field, value, PORT_MIN, PORT_MAX, "port")


def check_weight(field: str, value: int) -> int:
    return _check_int_range(field, value, WEIGHT_MIN, WEIGHT_MAX, "weight")


def check_meta(field: str, value: dict[str, str]) -> dict[str, str]:
    """Returns a new dict sorted by key, so equal meta always packs to equal bytes."""
    if len(value) > META_KEYS_MAX:
        raise InvalidArgument(f"field {field!r}: {len(value)} entries, at most {META_KEYS_MAX} allowed")
    for key, val in value.items():
        # Inline name check: building the error's field name per key costs more than the check.
        if not 0 < len(key) <= NAME_CHARS_MAX or _NAME_RE.fullmatch(key) is None:
            check_name(f"{field}.key", key)
        # isascii() is O(1) on CPython's compact strings; only non-ASCII needs the encode test.
        if len(val) > META_VALUE_CHARS_MAX or not (val.isascii() or _encodable(val)):
            raise InvalidArgument(
                f"field {field!r}: value of {key!r} must be at most {META_VALUE_CHARS_MAX} "
                "chars of valid unicode"
            )
    return dict(sorted(value.items()))


def check_tags(field: str, value: list[str]) -> list[str]:
    """Returns a new list with duplicates removed (first occurrence kept).

    A tag is any printable text: spaces are allowed (routing rules live in tags), control
    characters, other whitespace (tab, newline) and lone surrogates are not (``str.isprintable``).
    """
    if len(value) > TAGS_MAX:
        raise InvalidArgument(f"field {field!r}: {len(value)} tags, at most {TAGS_MAX} allowed")
    for tag in value:
        if not 0 < len(tag) <= TAG_CHARS_MAX or not tag.isprintable():
            raise InvalidArgument(
                f"field {field!r}: tag {_q(tag)} must be 1..{TAG_CHARS_MAX} printable chars "
                "(spaces allowed, no control characters, tabs or newlines)"
            )
    # dict.fromkeys: order-preserving de-duplication.
    return list(dict.fromkeys(value))


def check_status(field: str, value: str) -> str:
    if value not in STATUSES:
        raise InvalidArgument(f"field {field!r}: {_q(value)} is not one of {', '.join(STATUSES)}")
    return value


def check_note(field: str, value: str) -> str:
    if len(value) > NOTE_CHARS_MAX or not (value.isascii() or _encodable(value)):
        raise InvalidArgument(f"field {field!r}: at most {NOTE_CHARS_MAX} chars of valid unicode")
    return value


def check_ttl_ms(field: str, value: int) -> int:
    return _check_int_range(field, value, LEASE_TTL_MS_MIN, LEASE_TTL_MS_MAX, "ttl")


def check_lease_id(field: str, value: int) -> int:
    return _check_int_range(field, value, 1, INT_MAX, "lease id")


def check_optional_lease_id(field: str, value: int | None) -> int | None:
    return None if value is None else check_lease_id(field, value)


def check_lease_list(field: str, value: list[int]) -> list[int]:
    """Returns the distinct lease ids, sorted (expiry order is then canonical)."""
    if len(value) > LEASE_EXPIRE_BATCH_MAX:
        raise InvalidArgument(
            f"field {field!r}: {len(value)} leases, at most {LEASE_EXPIRE_BATCH_MAX} per command"
        )
    for lease in value:
        check_lease_id(field, lease)
    return sorted(set(value))


def check_guard(field: str, value: int | None) -> int | None:
    """Compare-and-set guard: expected mod_revision, 0 meaning "must not exist"."""
    return None if value is None else _check_int_range(field, value, 0, INT_MAX, "revision")


def check_epoch(field: str, value: int) -> int:
    return _check_int_range(field, value, 0, INT_MAX, "epoch")


#: Smallest state byte budget a leader may announce: below it a cluster could hardly hold its own ACLs.
STATE_BYTES_MAX_MIN: Final = 1 << 20


def check_state_bytes_max(field: str, value: int) -> int:
    return _check_int_range(field, value, STATE_BYTES_MAX_MIN, INT_MAX, "byte budget")


def check_optional_state_bytes_max(field: str, value: int | None) -> int | None:
    return None if value is None else check_state_bytes_max(field, value)


_INCARNATION: Final = re.compile(r"[0-9a-f]{32}")
IDENTITY_MODES: Final = ("create", "replace")


def check_incarnation(field: str, value: str) -> str:
    """A data directory's identity (see registry.raft.incarnation): 32 lowercase hex digits."""
    if not _INCARNATION.fullmatch(value):
        raise InvalidArgument(f"field {field!r}: incarnation must be 32 lowercase hex digits")
    return value


def check_identity_mode(field: str, value: str) -> str:
    if value not in IDENTITY_MODES:
        raise InvalidArgument(f"field {field!r}: {_q(value)} is not one of {', '.join(IDENTITY_MODES)}")
    return value


def check_key(field: str, value: str) -> str:
    """KV key or lock name: printable, no whitespace, path-like keys allowed."""
    if not 0 < len(value) <= KEY_CHARS_MAX or not _is_token(value):
        raise InvalidName(
            f"field {field!r}: {_q(value)} is not a valid key "
            f"(1..{KEY_CHARS_MAX} printable chars, no whitespace)"
        )
    return value


def check_key_prefix(field: str, value: str) -> str:
    """Like check_key, but the empty prefix (everything) is allowed."""
    return value if value == "" else check_key(field, value)


def check_value(field: str, value: str) -> str:
    # ASCII (the common case) is one byte per char: skip the encode.
    if value.isascii():
        size = len(value)
    else:
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError:
            raise InvalidArgument(f"field {field!r}: not valid unicode (lone surrogate)") from None
    if size > VALUE_BYTES_MAX:
        raise InvalidArgument(f"field {field!r}: {size} bytes, at most {VALUE_BYTES_MAX} allowed")
    return value


def check_holder(field: str, value: str) -> str:
    if len(value) > HOLDER_CHARS_MAX or not value.isprintable():
        raise InvalidArgument(f"field {field!r}: at most {HOLDER_CHARS_MAX} printable chars")
    return value


def check_rid(field: str, value: str | None) -> str | None:
    if value is not None and (not 0 < len(value) <= RID_CHARS_MAX or not value.isprintable()):
        raise InvalidArgument(f"field {field!r}: request id must be 1..{RID_CHARS_MAX} printable chars")
    return value


def check_now_ms(field: str, value: int | None) -> int | None:
    return None if value is None else _check_int_range(field, value, 0, INT_MAX, "timestamp")


# ---------------------------------------------------------------------------
# Record constructors.  The only places records are built, so key order and
# shape are fixed.  Arguments must already be validated.
# ---------------------------------------------------------------------------


def service_record(
    name: str, meta: dict[str, str], tags: list[str], create_revision: int, mod_revision: int
) -> Record:
    return {
        "name": name,
        "meta": meta,
        "tags": tags,
        "create_revision": create_revision,
        "mod_revision": mod_revision,
    }


def instance_record(
    service: str,
    id: str,
    address: str,
    port: int,
    meta: dict[str, str],
    tags: list[str],
    weight: int,
    status: str,
    lease: int | None,
    create_revision: int,
    mod_revision: int,
) -> Record:
    return {
        "service": service,
        "id": id,
        "address": address,
        "port": port,
        "meta": meta,
        "tags": tags,
        "weight": weight,
        "status": status,
        "lease": lease,
        "create_revision": create_revision,
        "mod_revision": mod_revision,
    }


def lease_record(lease: int, ttl_ms: int, granted_ms: int) -> Record:
    return {"lease": lease, "ttl_ms": ttl_ms, "granted_ms": granted_ms}


def lease_pack(ttl_ms: int, granted_ms: int) -> int:
    """The compact in-state form of a lease (its id is the dict key); exact for any int granted_ms."""
    return (granted_ms << LEASE_TTL_BITS) | ttl_ms


def lease_ttl_ms(packed: int) -> int:
    return packed & _LEASE_TTL_MASK


def lease_granted_ms(packed: int) -> int:
    return packed >> LEASE_TTL_BITS


def key_record(key: str, value: str, lease: int | None, create_revision: int, mod_revision: int) -> Record:
    return {
        "key": key,
        "value": value,
        "lease": lease,
        "create_revision": create_revision,
        "mod_revision": mod_revision,
    }


def lock_record(name: str, lease: int, holder: str, token: int, create_revision: int) -> Record:
    return {
        "name": name,
        "lease": lease,
        "holder": holder,
        "token": token,
        "create_revision": create_revision,
    }


# ---------------------------------------------------------------------------
# Record parsers, for restoring snapshots: untrusted dict -> fresh record.
# They check exact key sets, types and every field rule, and raise BadRequest.
# ---------------------------------------------------------------------------


def _fields(obj: Any, kind: str, keys: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(obj, dict) or set(obj) != set(keys):
        raise BadRequest(f"malformed {kind} record: {_q(obj)}")
    return obj


def _str(kind: str, obj: dict[str, Any], key: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise BadRequest(f"{kind} record: {key!r} must be str")
    return value


def _int(kind: str, obj: dict[str, Any], key: str, low: int = 0) -> int:
    value = obj[key]
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= INT_MAX:
        raise BadRequest(f"{kind} record: {key!r} must be int in {low}..{INT_MAX}")
    return value


def _opt_lease(kind: str, obj: dict[str, Any]) -> int | None:
    return None if obj["lease"] is None else _int(kind, obj, "lease", 1)


def _meta(kind: str, obj: dict[str, Any]) -> dict[str, str]:
    value = obj["meta"]
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise BadRequest(f"{kind} record: 'meta' must be map<str,str>")
    return check_meta("meta", value)


def _tags(kind: str, obj: dict[str, Any]) -> list[str]:
    value = obj["tags"]
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise BadRequest(f"{kind} record: 'tags' must be list<str>")
    return check_tags("tags", value)


def _revisions(kind: str, obj: dict[str, Any]) -> tuple[int, int]:
    create, mod = _int(kind, obj, "create_revision", 1), _int(kind, obj, "mod_revision", 1)
    if create > mod:
        raise BadRequest(f"{kind} record: create_revision {create} > mod_revision {mod}")
    return create, mod


def parse_service_record(obj: Any) -> Record:
    o = _fields(obj, "service", ("name", "meta", "tags", "create_revision", "mod_revision"))
    return service_record(
        check_name("name", _str("service", o, "name")),
        _meta("service", o),
        _tags("service", o),
        *_revisions("service", o),
    )


def parse_instance_record(obj: Any) -> Record:
    kind = "instance"
    keys = (
        "service", "id", "address", "port", "meta", "tags", "weight", "status", "lease",
        "create_revision", "mod_revision",
    )  # fmt: skip
    # "note" is there only while the last status change carried one (see RegistryState._op_set_status).
    o = _fields(obj, kind, (*keys, "note") if isinstance(obj, dict) and "note" in obj else keys)
    record = instance_record(
        check_name("service", _str(kind, o, "service")),
        check_name("id", _str(kind, o, "id")),
        check_address("address", _str(kind, o, "address")),
        check_port("port", _int(kind, o, "port")),
        _meta(kind, o),
        _tags(kind, o),
        check_weight("weight", _int(kind, o, "weight")),
        check_status("status", _str(kind, o, "status")),
        _opt_lease(kind, o),
        *_revisions(kind, o),
    )
    if "note" in o:
        note = check_note("note", _str(kind, o, "note"))
        if not note:
            raise BadRequest(f"{kind} record: an empty 'note' is left out, not stored")
        record["note"] = note
    return record


def parse_lease_record(obj: Any) -> Record:
    o = _fields(obj, "lease", ("lease", "ttl_ms", "granted_ms"))
    return lease_record(
        _int("lease", o, "lease", 1),
        check_ttl_ms("ttl_ms", _int("lease", o, "ttl_ms")),
        _int("lease", o, "granted_ms"),
    )


def parse_key_record(obj: Any) -> Record:
    o = _fields(obj, "key", ("key", "value", "lease", "create_revision", "mod_revision"))
    return key_record(
        check_key("key", _str("key", o, "key")),
        check_value("value", _str("key", o, "value")),
        _opt_lease("key", o),
        *_revisions("key", o),
    )


def parse_lock_record(obj: Any) -> Record:
    o = _fields(obj, "lock", ("name", "lease", "holder", "token", "create_revision"))
    token, create = _int("lock", o, "token", 1), _int("lock", o, "create_revision", 1)
    if token != create:
        raise BadRequest(f"lock record: token {token} != create_revision {create}")
    return lock_record(
        check_key("name", _str("lock", o, "name")),
        _int("lock", o, "lease", 1),
        check_holder("holder", _str("lock", o, "holder")),
        token,
        create,
    )
