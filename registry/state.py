"""The registry's replicated state machine: services, instances, leases, KV, locks.

Contract
========

``RegistryState.apply(command)`` is the only way to change the state.  It is a
pure, deterministic function of (state, command): no I/O, no clocks, no
randomness, no threads, no global mutable state.  Every replica applies the
same committed Raft log in the same order and therefore holds byte-identical
``snapshot()`` output at every log index.  Anything time-dependent enters only
through the command (``now_ms`` stamped by the proposer; ``lease_expire``
decided by the leader and committed through the log).

* ``apply`` validates the command fully (:func:`registry.commands.validate_command`)
  and checks every precondition *before* mutating anything.  A command that
  raises leaves the state unchanged -- with one deliberate exception: if it
  carried a ``rid``, its failure is remembered in the de-duplication table so
  a retry gets the same answer (see below).  Only ``RegistryError``
  subclasses are raised for any input; anything else is a bug.
* ``revision`` is a global counter starting at 0.  A command that changes
  services, instances, leases, keys or locks increments it by exactly one,
  however many records it touches (revoking a lease that carries 1000
  instances is one revision with 1001 events).  A command that changes none
  of them (barrier, leader_epoch, a no-op set_status, re-acquiring a held
  lock, a stale or empty lease_expire) leaves it alone.  It never decreases.
* Each successful ``apply`` returns ``Applied(result, events)``.  ``result``
  always has ``"revision"`` (the state revision after the command); events
  describe every record change, all stamped with that one revision.
* Records are immutable after creation: a change builds a new dict and the
  old one goes into the event's ``before``.  Events and the state therefore
  share record objects safely; consumers must treat events as read-only.
  Queries return copies.

Theory of operation
===================

Primary data: ``_services`` (name -> record), ``_instances`` (service name ->
instance id -> record; a service has an entry iff it exists), ``_leases``,
``_keys``, ``_locks``.  Derived index: ``_attached`` (lease id -> the
instances, keys and locks carrying that lease), maintained on every change so
revoke/expire cost O(attachments), never a scan.  The index is not in the
snapshot; ``restore`` rebuilds it from the records.  Whenever a command
touches several records they are processed in sorted order, so event order
does not depend on dict insertion history (a replica restored from a snapshot
emits the same events as one that replayed the log).

Lease ids come from a counter in the state (``_next_lease``) and are never
reused.  Lease *deadlines* are not replicated: the leader keeps them in
memory (rebuilt from ``lease_ttls()`` on election), and commits
``lease_expire`` carrying its leadership ``epoch``; an expiry proposed by a
deposed leader (epoch below ``state.epoch``) is dropped whole.

De-duplication: a command with a ``rid`` (except ``barrier``, which is a pure
read barrier and always re-executes) has its outcome -- result or error class
and message -- stored in a bounded FIFO table keyed by rid.  A later command
with the same rid returns that stored outcome (no events, original revision)
without re-applying, making client retries after a timeout exactly-once.  The
table is part of the snapshot, and eviction is FIFO by insertion, so it is
deterministic too.  Validation errors are not stored: they depend only on the
command, so a retry reproduces them anyway.

Snapshots are msgpack (never pickle) ``{"format": 1, ...}`` with every
collection sorted, so equal states give equal bytes and
``restore(s.snapshot()).snapshot() == s.snapshot()``.  ``restore`` treats its
input as untrusted and re-validates every record and cross-reference.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final, NamedTuple

import msgpack

from . import model
from .commands import OPS, validate_command
from .errors import CODES, BadRequest, Conflict, LimitExceeded, NotFound, RegistryError
from .model import Record

__all__ = ["Applied", "RegistryState", "SNAPSHOT_FORMAT"]

#: Version of the snapshot layout; bump (and keep reading old ones) on change.
SNAPSHOT_FORMAT: Final = 1

_SNAPSHOT_KEYS: Final = frozenset(
    ("format", "revision", "epoch", "next_lease", "services", "instances", "leases", "keys", "locks", "dedup")
)

# barrier is a read barrier: replaying an old revision to a retry would defeat it.
_UNRECORDED_OPS: Final = frozenset(("barrier",))


class Applied(NamedTuple):
    """Outcome of one successful ``apply``."""

    #: Always contains "revision": the state revision after the command.
    result: dict[str, Any]
    #: Events emitted by this command (empty if nothing changed).
    events: list[dict[str, Any]]


class _Attached:
    """What carries one lease: the derived index revoke/expire walk."""

    __slots__ = ("instances", "keys", "locks")

    def __init__(self) -> None:
        self.instances: set[tuple[str, str]] = set()
        self.keys: set[str] = set()
        self.locks: set[str] = set()


class _Outcome(NamedTuple):
    """A remembered outcome: either ``result`` or (``error``, ``message``)."""

    result: dict[str, Any] | None
    error: type[RegistryError] | None
    message: str


def _event(
    revision: int,
    type_: str,
    kind: str,
    service: str | None,
    id_: str | None,
    before: Record | None,
    after: Record | None,
) -> dict[str, Any]:
    return {
        "revision": revision,
        "type": type_,
        "kind": kind,
        "service": service,
        "id": id_,
        "before": before,
        "after": after,
    }


def _copy_result(result: dict[str, Any]) -> dict[str, Any]:
    # Results are flat apart from lease_expire's list of ints; copying keeps
    # the remembered outcome safe from callers that mutate theirs.
    out = dict(result)
    if "expired" in out:
        out["expired"] = list(out["expired"])
    return out


def _copy_record(rec: Record) -> Record:
    out = dict(rec)
    if "meta" in out:
        out["meta"] = dict(out["meta"])
        out["tags"] = list(out["tags"])
    return out


def _arg_str(field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"field {field!r} must be str, got {type(value).__name__}")
    return value


def _arg_lease(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRequest(f"field 'lease' must be int, got {type(value).__name__}")
    return model.check_lease_id("lease", value)


def _guard_failed(what: str, current: int, expected: int) -> Conflict:
    return Conflict(f"{what}: mod_revision is {current}, expected {expected} (0 = must not exist)")


class RegistryState:
    """The replicated registry state.  See the module docstring for the contract."""

    __slots__ = (
        "_attached",
        "_dedup",
        "_epoch",
        "_instances",
        "_keys",
        "_leases",
        "_locks",
        "_next_lease",
        "_revision",
        "_services",
    )

    def __init__(self) -> None:
        self._revision = 0
        self._epoch = 0
        self._next_lease = 1
        self._services: dict[str, Record] = {}
        self._instances: dict[str, dict[str, Record]] = {}
        self._leases: dict[int, Record] = {}
        self._attached: dict[int, _Attached] = {}
        self._keys: dict[str, Record] = {}
        self._locks: dict[str, Record] = {}
        # OrderedDict, not dict: popitem(last=False) is O(1), whereas evicting
        # the first key of a plain dict degrades to O(n) between resizes.
        self._dedup: OrderedDict[str, _Outcome] = OrderedDict()

    # ------------------------------------------------------------------ props

    @property
    def revision(self) -> int:
        return self._revision

    @property
    def epoch(self) -> int:
        return self._epoch

    # ------------------------------------------------------------------ apply

    def apply(self, command: dict[str, Any]) -> Applied:
        """Validate, de-duplicate and apply one command."""
        cmd = validate_command(command)
        op: str = cmd["op"]
        rid: str | None = cmd["rid"]
        if op in _UNRECORDED_OPS:
            rid = None
        if rid is not None:
            seen = self._dedup.get(rid)
            if seen is not None:
                if seen.error is not None:
                    raise seen.error(seen.message)
                assert seen.result is not None
                return Applied(_copy_result(seen.result), [])
        before = self._revision
        try:
            result, events = _HANDLERS[op](self, cmd)
        except RegistryError as err:
            assert self._revision == before, "a failing command changed the revision"
            if rid is not None:
                self._remember(rid, _Outcome(None, type(err), err.message))
            raise
        assert self._revision - before in (0, 1), "a command bumped the revision more than once"
        assert result["revision"] == self._revision
        if rid is not None:
            self._remember(rid, _Outcome(_copy_result(result), None, ""))
        return Applied(result, events)

    def _remember(self, rid: str, outcome: _Outcome) -> None:
        self._dedup[rid] = outcome
        if len(self._dedup) > model.DEDUP_ENTRIES_MAX:
            self._dedup.popitem(last=False)

    def _bump(self) -> int:
        """Take the one new revision of the current command (after all checks)."""
        rev = self._revision + 1
        assert rev > self._revision
        self._revision = rev
        return rev

    def _check_lease_exists(self, lease: int | None) -> None:
        if lease is not None and lease not in self._leases:
            raise NotFound(f"lease {lease} not found")

    # ------------------------------------------------------------------ services / instances

    def _op_service_put(self, cmd: dict[str, Any]) -> tuple[dict[str, Any], list[Record]]:
        name = cmd["name"]
        old = self._services.get(name)
        if old is None and len(self._services) >= model.SERVICES_MAX:
            raise LimitExceeded(f"at most {model.SERVICES_MAX} services")
        rev = self._bump()
        new = model.service_record(
            name, cmd["meta"], cmd["tags"], rev if old is None else old["create_revision"], rev
        )
        self._services[name] = new
        if old is None:
            self._instances[name] = {}
        return {"revision": rev, "created": old is None}, [
            _event(rev, "put", "service", name, None, old, new)
        ]

    def _op_service_delete(self, cmd: dict[str, Any]) -> tuple[dict[str, Any], list[Record]]:
        name = cmd["name"]
        old = self._services.get(name)
        if old is None:
            raise NotFound(f"service {name!r} not found")
        rev = self._bump()
        insts = self._instances.pop(name)
        events = []
        for iid in sorted(insts):
            rec = insts[iid]
            if rec["lease"] is not None:
                self._attached[rec["lease"]].instances.discard((name, iid))
            events.append(_event(rev, "delete", "instance", name, iid, rec, None))
        del self._services[name]
        events.append(_event(rev, "delete", "service", name, None, old, None))
        return {"revision": rev, "instances": len(insts)}, events

    def _op_register(self, cmd: dict[str, Any]) -> tuple[dict[str, Any], list[Record]]:
        svc, iid, lease = cmd["service"], cmd["id"], cmd["lease"]
        self._check_lease_exists(lease)
        insts = self._instances.get(svc)
        old = None if insts is None else insts.get(iid)
        guard = cmd["if_mod_revision"]
        if guard is not None:
            current = 0 if old is None else old["mod_revision"]
            if current != guard:
                raise _guard_failed(f"instance {svc}/{iid}", current, guard)
        if insts is None:
            if len(self._services) >= model.SERVICES_MAX:
                raise LimitExceeded(f"at most {model.SERVICES_MAX} services")
        elif old is None and len(insts) >= model.INSTANCES_PER_SERVICE_MAX:
            raise LimitExceeded(f"at most {model.INSTANCES_PER_SERVICE_MAX} instances per service")
        rev = self._bump()
        events = []
        if insts is None:
            service = model.service_record(svc, {}, [], rev, rev)
            self._services[svc] = service
            insts = self._instances[svc] = {}
            events.append(_event(rev, "put", "service", svc, None, None, service))
        new = model.instance_record(
            svc,
            iid,
            cmd["address"],
            cmd["port"],
            cmd["meta"],
            cmd["tags"],
            cmd["weight"],
            cmd["status"],
            lease,
            rev if old is None else old["create_revision"],
            rev,
        )
        insts[iid] = new
        old_lease = None if old is None else old["lease"]
        if old_lease != lease:
            if old_lease is not None:
                self._attached[old_lease].instances.discard((svc, iid))
            if lease is not None:
                self._attached[lease].instances.add((svc, iid))
        events.append(_event(rev, "put", "instance", svc, iid, old, new))
        return {"revision": rev, "created": old is None}, events

    def _find_instance(self, svc: str, iid: str) -> tuple[dict[str, Record], Record]:
        insts = self._instances.get(svc)
        old = None if insts is None else insts.get(iid)
        if insts is None or old is None:
            raise NotFound(f"instance {svc}/{iid} not found")
        return insts, old

    def _op_deregister(self, cmd: dict[str, Any]) -> tuple[dict[str, Any], list[Record]]:
        svc, iid = cmd["service"], cmd["id"]
        insts, old = self._find_instance(svc, iid)
        rev = self._bump()
        del insts[iid]
        if old["lease"] is not None:
            self._attached[old["lease"]].instances.discard((svc, iid))
        return {"revision": rev}, [_event(rev, "delete", "instance", svc, iid, old, None)]

    def _op_set_status(self, cmd: dict[str, Any]) -> tuple[dict[str, Any], list[Record]]:
        svc, iid, status = cmd["service"], cmd["id"], cmd["status"]
        insts, old = self._find_instance(svc, iid)
        if old["status"] == status:
            # Health checks re-report the same status constantly: not a change.
            return {"revision": self._revision, "changed": False}, []
        rev = self._bump()
        new = {**old, "status": status, "mod_revision": rev}
        insts[iid] = new
        event = _event(rev, "status", "instance", svc, iid, old, new)
        # The note (check output) is not part of the record: it only travels here.
        event["note"] = cmd["note"]
        return {"revision": rev, "changed": True}, [event]

    # ------------------------------------------------------------------ leases

    def _op_lease_grant(self, cmd: dict[str, Any]) -> tuple[dict[str, Any], list[Record]]:
        if len(self._leases) >= model.LEASES_MAX:
            raise LimitExceeded(f"at most {model.LEASES_MAX} leases")
        lease = self._next_lease
        if lease > model.INT_MAX:
            raise LimitExceeded("lease id space exhausted")
        ttl_ms = cmd["ttl_ms"]
        rev = self._bump()
        self._next_lease = lease + 1
        rec = model.lease_record(lease, ttl_ms, cmd["now_ms"])
        self._leases[lease] = rec
        self._attached[lease] = _Attached()
        return {"revision": rev, "lease": lease, "ttl_ms": ttl_ms}, [
            _event(rev, "put", "lease", None, str(lease), None, rec)
        ]

    def _drop_lease(self, lease: int, rev: int, type_: str, events: list[Record]) -> _Attached:
        """Remove a lease and everything attached to it; append the events."""
        att = self._attached.pop(lease)
        rec = self._leases.pop(lease)
        for svc, iid in sorted(att.instances):
            old = self._instances[svc].pop(iid)
            events.append(_event(rev, type_, "instance", svc, iid, old, None))
        for key in sorted(att.keys):
            events.append(_event(rev, type_, "key", None, key, self._keys.pop(key), None))
        for name in sorted(att.locks):
            events.append(_event(rev, type_, "lock", None, name, self._locks.pop(name), None))
        events.append(_event(rev, type_, "lease", None, str(lease), rec, None))
        return att

    def _op_lease_revoke(self, cmd: dict[str, Any]) -> tuple[dict[str, Any], list[Record]]:
        lease = cmd["lease"]
        self._check_lease_exists(lease)
        rev = self._bump()
        events: list[Record] = []
        att = self._drop_lease(lease, rev, "delete", events)
        result = {
            "revision": rev,
            "instances": len(att.instances),
            "keys": len(att.keys),
            "locks": len(att.locks),
        }
        return result, events

    def _op_lease_expire(self, cmd: dict[str, Any]) -> tuple[dict[str, Any], list[Record]]:
        epoch = cmd["epoch"]
        if epoch < self._epoch:
            # Proposed by a deposed leader whose deadlines may be stale.
            return {"revision": self._revision, "dropped": True}, []
        self._epoch = epoch
        # Already-gone leases (revoked, or expired by an earlier batch) are fine.
        live = [lease for lease in cmd["leases"] if lease in self._leases]
        if not live:
            return {"revision": self._revision, "dropped": False, "expired": []}, []
        rev = self._bump()
        events: list[Record] = []
        for lease in live:
            self._drop_lease(lease, rev, "expire", events)
        return {"revision": rev, "dropped": False, "expired": live}, events

    def _op_leader_epoch(self, cmd: dict[str, Any]) -> tuple[dict[str, Any], list[Record]]:
        self._epoch = max(self._epoch, cmd["epoch"])
        return {"revision": self._revision, "epoch": self._epoch}, []

    # ------------------------------------------------------------------ KV

    def _op_key_put(self, cmd: dict[str, Any]) -> tuple[dict[str, Any], list[Record]]:
        key, lease = cmd["key"], cmd["lease"]
        self._check_lease_exists(lease)
        old = self._keys.get(key)
        guard = cmd["if_mod_revision"]
        if guard is not None:
            current = 0 if old is None else old["mod_revision"]
            if current != guard:
                raise _guard_failed(f"key {key!r}", current, guard)
        if old is None and len(self._keys) >= model.KEYS_MAX:
            raise LimitExceeded(f"at most {model.KEYS_MAX} keys")
        rev = self._bump()
        new = model.key_record(key, cmd["value"], lease, rev if old is None else old["create_revision"], rev)
        self._keys[key] = new
        old_lease = None if old is None else old["lease"]
        if old_lease != lease:
            if old_lease is not None:
                self._attached[old_lease].keys.discard(key)
            if lease is not None:
                self._attached[lease].keys.add(key)
        return {"revision": rev, "created": old is None}, [_event(rev, "put", "key", None, key, old, new)]

    def _op_key_delete(self, cmd: dict[str, Any]) -> tuple[dict[str, Any], list[Record]]:
        key = cmd["key"]
        old = self._keys.get(key)
        if old is None:
            raise NotFound(f"key {key!r} not found")
        guard = cmd["if_mod_revision"]
        if guard is not None and old["mod_revision"] != guard:
            raise _guard_failed(f"key {key!r}", old["mod_revision"], guard)
        rev = self._bump()
        del self._keys[key]
        if old["lease"] is not None:
            self._attached[old["lease"]].keys.discard(key)
        return {"revision": rev}, [_event(rev, "delete", "key", None, key, old, None)]

    # ------------------------------------------------------------------ locks

    def _op_lock_acquire(self, cmd: dict[str, Any]) -> tuple[dict[str, Any], list[Record]]:
        name, lease = cmd["name"], cmd["lease"]
        self._check_lease_exists(lease)
        cur = self._locks.get(name)
        if cur is not None:
            if cur["lease"] == lease:
                # Idempotent re-acquire (e.g. a retry without rid): same token.
                return {"revision": self._revision, "token": cur["token"], "acquired": False}, []
            raise Conflict(
                f"lock {name!r} is held by {cur['holder']!r} (lease {cur['lease']}) with token {cur['token']}"
            )
        rev = self._bump()
        # The fencing token is the revision at which the lock was taken: it
        # grows across every holder, so resources can reject stale holders.
        rec = model.lock_record(name, lease, cmd["holder"], rev, rev)
        self._locks[name] = rec
        self._attached[lease].locks.add(name)
        return {"revision": rev, "token": rev, "acquired": True}, [
            _event(rev, "put", "lock", None, name, None, rec)
        ]

    def _op_lock_release(self, cmd: dict[str, Any]) -> tuple[dict[str, Any], list[Record]]:
        name, lease = cmd["name"], cmd["lease"]
        cur = self._locks.get(name)
        if cur is None or cur["lease"] != lease:
            raise NotFound(f"lock {name!r} is not held by lease {lease}")
        rev = self._bump()
        del self._locks[name]
        self._attached[lease].locks.discard(name)
        return {"revision": rev}, [_event(rev, "delete", "lock", None, name, cur, None)]

    def _op_barrier(self, cmd: dict[str, Any]) -> tuple[dict[str, Any], list[Record]]:
        return {"revision": self._revision}, []

    # ------------------------------------------------------------------ queries (pure)

    def get_service(self, name: str) -> dict[str, Any]:
        name = _arg_str("name", name)
        svc = self._services.get(name)
        if svc is None:
            raise NotFound(f"service {name!r} not found")
        insts = self._instances[name]
        return {"service": _copy_record(svc), "instances": [_copy_record(insts[i]) for i in sorted(insts)]}

    def list_services(self) -> list[dict[str, Any]]:
        out = []
        for name in sorted(self._services):
            svc = self._services[name]
            insts = self._instances[name]
            out.append(
                {
                    "name": name,
                    "tags": list(svc["tags"]),
                    "meta": dict(svc["meta"]),
                    "instances": len(insts),
                    "passing": sum(1 for i in insts.values() if i["status"] == "passing"),
                }
            )
        return out

    def get_instance(self, service: str, id: str) -> dict[str, Any]:
        _, rec = self._find_instance(_arg_str("service", service), _arg_str("id", id))
        return _copy_record(rec)

    def get_lease(self, lease_id: int) -> dict[str, Any]:
        lease_id = _arg_lease(lease_id)
        rec = self._leases.get(lease_id)
        if rec is None:
            raise NotFound(f"lease {lease_id} not found")
        att = self._attached[lease_id]
        return {
            **rec,
            "instances": [list(pair) for pair in sorted(att.instances)],
            "locks": sorted(att.locks),
            "keys": sorted(att.keys),
        }

    def list_leases(self) -> list[dict[str, Any]]:
        """Leases sorted by id, with attachment *counts* (get_lease has the lists)."""
        out = []
        for lease in sorted(self._leases):
            att = self._attached[lease]
            out.append(
                {
                    **self._leases[lease],
                    "instances": len(att.instances),
                    "locks": len(att.locks),
                    "keys": len(att.keys),
                }
            )
        return out

    def lease_ttls(self) -> dict[int, int]:
        return {lease: rec["ttl_ms"] for lease, rec in self._leases.items()}

    def get_key(self, key: str) -> dict[str, Any]:
        key = _arg_str("key", key)
        rec = self._keys.get(key)
        if rec is None:
            raise NotFound(f"key {key!r} not found")
        return dict(rec)

    def list_keys(self, prefix: str = "") -> list[dict[str, Any]]:
        prefix = _arg_str("prefix", prefix)
        return [dict(self._keys[k]) for k in sorted(k for k in self._keys if k.startswith(prefix))]

    def get_lock(self, name: str) -> dict[str, Any]:
        name = _arg_str("name", name)
        rec = self._locks.get(name)
        if rec is None:
            raise NotFound(f"lock {name!r} is free")
        return dict(rec)

    # ------------------------------------------------------------------ snapshot / restore

    def snapshot(self) -> bytes:
        """The whole state as canonical msgpack bytes (equal states -> equal bytes)."""
        instances: list[Record] = []
        for name in sorted(self._instances):
            insts = self._instances[name]
            instances.extend(insts[i] for i in sorted(insts))
        dedup: list[list[Any]] = []
        for rid, outcome in self._dedup.items():
            if outcome.error is None:
                dedup.append([rid, {"result": outcome.result}])
            else:
                dedup.append([rid, {"error": outcome.error.code, "message": outcome.message}])
        obj = {
            "format": SNAPSHOT_FORMAT,
            "revision": self._revision,
            "epoch": self._epoch,
            "next_lease": self._next_lease,
            "services": [self._services[n] for n in sorted(self._services)],
            "instances": instances,
            "leases": [self._leases[n] for n in sorted(self._leases)],
            "keys": [self._keys[n] for n in sorted(self._keys)],
            "locks": [self._locks[n] for n in sorted(self._locks)],
            "dedup": dedup,
        }
        data: bytes = msgpack.packb(obj, use_bin_type=True)
        return data

    @classmethod
    def restore(cls, data: bytes) -> RegistryState:
        """Rebuild a state from ``snapshot()`` bytes; BadRequest on corrupt/foreign data."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise BadRequest(f"snapshot must be bytes, got {type(data).__name__}")
        try:
            obj = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
        except Exception as exc:  # msgpack signals corruption with many exception types
            raise BadRequest(f"corrupt snapshot: {type(exc).__name__}: {exc}"[:200]) from None
        try:
            return cls._from_snapshot_obj(obj)
        except BadRequest as exc:
            raise BadRequest(f"corrupt snapshot: {exc.message}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            # Defensive: any shape the checks below missed is still just bad data.
            raise BadRequest(f"corrupt snapshot: {type(exc).__name__}: {exc}"[:200]) from None

    @classmethod
    def _from_snapshot_obj(cls, obj: Any) -> RegistryState:
        if not isinstance(obj, dict):
            raise BadRequest("not a registry snapshot")
        fmt = obj.get("format")
        if type(fmt) is not int or fmt != SNAPSHOT_FORMAT:
            raise BadRequest(f"unsupported snapshot format {fmt!r:.40}")
        if set(obj) != _SNAPSHOT_KEYS:
            raise BadRequest(f"unexpected top-level keys {sorted(map(str, set(obj) ^ _SNAPSHOT_KEYS))}")

        def snap_int(key: str, low: int) -> int:
            value = obj[key]
            if type(value) is not int or not low <= value <= model.INT_MAX + 1:
                raise BadRequest(f"{key!r} must be an int >= {low}")
            return value

        def snap_list(key: str) -> list[Any]:
            value = obj[key]
            if not isinstance(value, list):
                raise BadRequest(f"{key!r} must be a list")
            return value

        st = cls()
        st._revision = revision = snap_int("revision", 0)
        st._epoch = snap_int("epoch", 0)
        st._next_lease = snap_int("next_lease", 1)

        def check_rev(what: str, rec: Record, key: str = "mod_revision") -> None:
            if rec[key] > revision:
                raise BadRequest(f"{what}: {key} {rec[key]} > snapshot revision {revision}")

        def check_lease(what: str, lease: int | None) -> None:
            if lease is not None and lease not in st._leases:
                raise BadRequest(f"{what}: lease {lease} does not exist")

        for raw in snap_list("leases"):
            rec = model.parse_lease_record(raw)
            lease = rec["lease"]
            if lease in st._leases or lease >= st._next_lease:
                raise BadRequest(f"lease {lease}: duplicate or not below next_lease")
            st._leases[lease] = rec
            st._attached[lease] = _Attached()
        for raw in snap_list("services"):
            rec = model.parse_service_record(raw)
            name = rec["name"]
            if name in st._services:
                raise BadRequest(f"duplicate service {name!r}")
            check_rev(f"service {name!r}", rec)
            st._services[name] = rec
            st._instances[name] = {}
        for raw in snap_list("instances"):
            rec = model.parse_instance_record(raw)
            svc, iid, lease = rec["service"], rec["id"], rec["lease"]
            insts = st._instances.get(svc)
            if insts is None or iid in insts:
                raise BadRequest(f"instance {svc}/{iid}: unknown service or duplicate")
            check_lease(f"instance {svc}/{iid}", lease)
            check_rev(f"instance {svc}/{iid}", rec)
            insts[iid] = rec
            if lease is not None:
                st._attached[lease].instances.add((svc, iid))
        for raw in snap_list("keys"):
            rec = model.parse_key_record(raw)
            key, lease = rec["key"], rec["lease"]
            if key in st._keys:
                raise BadRequest(f"duplicate key {key!r}")
            check_lease(f"key {key!r}", lease)
            check_rev(f"key {key!r}", rec)
            st._keys[key] = rec
            if lease is not None:
                st._attached[lease].keys.add(key)
        for raw in snap_list("locks"):
            rec = model.parse_lock_record(raw)
            name, lease = rec["name"], rec["lease"]
            if name in st._locks:
                raise BadRequest(f"duplicate lock {name!r}")
            check_lease(f"lock {name!r}", lease)
            check_rev(f"lock {name!r}", rec, "create_revision")
            st._locks[name] = rec
            st._attached[lease].locks.add(name)
        dedup = snap_list("dedup")
        if len(dedup) > model.DEDUP_ENTRIES_MAX:
            raise BadRequest(f"dedup table has {len(dedup)} entries, at most {model.DEDUP_ENTRIES_MAX}")
        for entry in dedup:
            rid, outcome = cls._parse_dedup_entry(entry, revision)
            if rid in st._dedup:
                raise BadRequest(f"duplicate request id {rid!r}")
            st._dedup[rid] = outcome
        st.check_invariants()
        return st

    @staticmethod
    def _parse_dedup_entry(entry: Any, revision: int) -> tuple[str, _Outcome]:
        if not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[0], str):
            raise BadRequest("malformed dedup entry")
        rid = model.check_rid("rid", entry[0])
        assert rid is not None
        out = entry[1]
        if isinstance(out, dict) and set(out) == {"result"}:
            result = out["result"]
            if (
                not isinstance(result, dict)
                or type(result.get("revision")) is not int
                or not 0 <= result["revision"] <= revision
            ):
                raise BadRequest(f"dedup entry {rid!r}: malformed result")
            return rid, _Outcome(result, None, "")
        if isinstance(out, dict) and set(out) == {"error", "message"}:
            err_cls = CODES.get(out["error"]) if isinstance(out["error"], str) else None
            if err_cls is None or not isinstance(out["message"], str):
                raise BadRequest(f"dedup entry {rid!r}: malformed error")
            return rid, _Outcome(None, err_cls, out["message"])
        raise BadRequest(f"dedup entry {rid!r}: malformed outcome")

    # ------------------------------------------------------------------ invariants

    def check_invariants(self) -> None:
        """Cross-check the derived index and revisions (O(state); for tests and restore).

        Raises BadRequest on any inconsistency (restore reports it as corrupt data).
        """

        def fail(msg: str) -> None:
            raise BadRequest(f"invariant violated: {msg}")

        if set(self._services) != set(self._instances):
            fail("services and instance tables disagree")
        if set(self._leases) != set(self._attached):
            fail("leases and attachment index disagree")
        expect = {lease: _Attached() for lease in self._leases}

        def holder_of(what: str, rec: Record) -> _Attached | None:
            lease = rec["lease"]
            if lease is not None and lease not in expect:
                fail(f"{what} carries missing lease {lease}")
            return None if lease is None else expect[lease]

        for svc, insts in self._instances.items():
            for iid, rec in insts.items():
                if rec["service"] != svc or rec["id"] != iid:
                    fail(f"instance {svc}/{iid} stored under the wrong key")
                if rec["mod_revision"] > self._revision:
                    fail(f"instance {svc}/{iid} modified after the current revision")
                att = holder_of(f"instance {svc}/{iid}", rec)
                if att is not None:
                    att.instances.add((svc, iid))
        for key, rec in self._keys.items():
            if rec["key"] != key or rec["mod_revision"] > self._revision:
                fail(f"key {key!r} stored under the wrong key or ahead of revision")
            att = holder_of(f"key {key!r}", rec)
            if att is not None:
                att.keys.add(key)
        for name, rec in self._locks.items():
            if rec["name"] != name or rec["token"] > self._revision:
                fail(f"lock {name!r} stored under the wrong name or token ahead of revision")
            att = holder_of(f"lock {name!r}", rec)
            if att is not None:
                att.locks.add(name)
        for lease, att in self._attached.items():
            want = expect[lease]
            if (att.instances, att.keys, att.locks) != (want.instances, want.keys, want.locks):
                fail(f"attachment index of lease {lease} is stale")
            if lease >= self._next_lease:
                fail(f"lease {lease} not below next_lease")


_Handler = Callable[[RegistryState, dict[str, Any]], tuple[dict[str, Any], list[Record]]]

#: op -> handler.  A handler checks every precondition (raising RegistryError)
#: before its first mutation, and calls _bump() at most once.
_HANDLERS: Final[dict[str, _Handler]] = {
    "service_put": RegistryState._op_service_put,
    "service_delete": RegistryState._op_service_delete,
    "register": RegistryState._op_register,
    "deregister": RegistryState._op_deregister,
    "set_status": RegistryState._op_set_status,
    "lease_grant": RegistryState._op_lease_grant,
    "lease_revoke": RegistryState._op_lease_revoke,
    "lease_expire": RegistryState._op_lease_expire,
    "leader_epoch": RegistryState._op_leader_epoch,
    "key_put": RegistryState._op_key_put,
    "key_delete": RegistryState._op_key_delete,
    "lock_acquire": RegistryState._op_lock_acquire,
    "lock_release": RegistryState._op_lock_release,
    "barrier": RegistryState._op_barrier,
}
assert set(_HANDLERS) == OPS, "every schema'd op needs a handler and vice versa"
