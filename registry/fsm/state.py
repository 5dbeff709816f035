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

* ``apply`` validates the command fully (:func:`registry.fsm.commands.validate_command`)
  and checks every precondition *before* mutating anything.  The one
  exception is ``apply(cmd, trusted=True)``, used for commands read from the
  Raft log: every proposer validated them already (``Proposer.write``), and
  validation is a fixed point, so re-running it on every replica only costs
  CPU.  Those get a cheap structural guard instead
  (:func:`registry.fsm.commands.is_normalised`: exact key set and value types);
  a command failing the guard -- an entry written by an older version, a
  hand-built command -- is validated fully, as before.  A command that
  raises leaves the state unchanged -- with one deliberate exception: if it
  carried a ``rid``, its failure is remembered in the de-duplication table so
  a retry gets the same answer (see below).  Only ``RegistryError``
  subclasses are raised for any input; anything else is a bug.
* ``revision`` is a global counter starting at 0.  A command that changes
  services, instances, leases, keys or locks increments it by exactly one,
  however many records it touches (revoking a lease that carries 1000
  instances is one revision with 1001 events).  A command that changes none
  of them (barrier, leader_epoch, identity_put/delete, a no-op set_status,
  re-acquiring a held lock, a stale or empty lease_expire) leaves it alone.  It never decreases.
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
revoke/expire cost O(attachments), never a scan.  Every node holds every
lease, so both are compact: ``_leases`` maps an id to one packed int
(``model.lease_pack``; the record dict is built only for events, queries and
snapshots), and a lease has an ``_attached`` entry only once something is
attached to it (a bare lease costs no sets).  The index is not in the
snapshot; ``restore`` rebuilds it from the records.  Whenever a command
touches several records they are processed in sorted order, so event order
does not depend on dict insertion history (a replica restored from a snapshot
emits the same events as one that replayed the log).

Lease ids come from a counter in the state (``_next_lease``) and are never
reused.  Lease *deadlines* are not replicated: the leader keeps them in
memory (rebuilt from ``lease_ttls()`` on election), and commits
``lease_expire`` carrying its leadership ``epoch``; an expiry proposed by a
deposed leader (epoch below ``state.epoch``, or not the term of the log entry
that carries it) is dropped whole.

De-duplication: a command with a ``rid`` (except ``barrier``, which is a pure
read barrier and always re-executes) has its outcome -- result or error class
and message -- stored in a bounded FIFO table keyed by (caller, rid), the
caller being the token hash the node stamped in ``auth`` ("" without ACLs):
one caller's rid never answers another's command.  A command refused by
authorization is not remembered at all, so callers without permission cannot
push other callers' records out of the table.  A later command
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

from registry.errors import (
    CODES,
    BadRequest,
    Conflict,
    LimitExceeded,
    NotFound,
    PermissionDenied,
    RegistryError,
    Unauthenticated,
)
from registry.fsm import acl, model
from registry.fsm.commands import OPS, is_normalised, validate_command
from registry.fsm.limits import StateLimits
from registry.fsm.model import Record

__all__ = ["Applied", "RegistryState", "SNAPSHOT_FORMAT"]

#: Version of the snapshot layout; bump (and keep reading old ones) on change.
SNAPSHOT_FORMAT: Final = 1

_SNAPSHOT_KEYS: Final = frozenset(
    ("format", "revision", "epoch", "next_lease", "services", "instances", "leases", "keys", "locks", "dedup")
)
#: Optional top-level keys: absent in snapshots taken before ACLs existed (or with nothing in them),
#: and then they mean "empty" -- so a state that never used ACLs snapshots to the same bytes as before.
_SNAPSHOT_OPTIONAL_KEYS: Final = frozenset(("acl", "identities", "lease_owners", "state_bytes_max"))
_ACL_SNAPSHOT_KEYS: Final = frozenset(("bootstrapped", "tokens", "roles", "users", "intentions", "intention_default"))
ACL_TOKENS_MAX: Final = 100_000
#: Login tokens one user holds at once, the oldest removed first: every login adds one, and a
#: user with a password could otherwise fill the token table alone.
LOGIN_TOKENS_PER_USER_MAX: Final = 16
#: Expired tokens one token creation removes at most (it removes them first): bounds one command's work.
EXPIRED_TOKENS_PER_COMMAND_MAX: Final = 1000
ACL_ROLES_MAX: Final = 10_000
ACL_USERS_MAX: Final = 100_000
INTENTIONS_MAX: Final = 100_000
#: Recorded member identities (one per Raft address ever added and not removed).
IDENTITIES_MAX: Final = 1_000
INTENTION_DEFAULT: Final = "allow"

# barrier is a read barrier: replaying an old revision to a retry would defeat it.
_UNRECORDED_OPS: Final = frozenset(("barrier",))


class Applied(NamedTuple):
    """Outcome of one successful ``apply``."""

    #: Always contains "revision": the state revision after the command.
    result: dict[str, Any]
    #: Events emitted by this command (empty if nothing changed).
    events: list[dict[str, Any]]


class _Attached:
    """What carries one lease: the derived index revoke/expire walk.

    Each set is created on first access: an empty set costs 216 bytes, and a
    lease typically carries one instance and no keys or locks, so eager sets
    would be two thirds of the index's memory on every node.  Properties over
    ``None``-able slots rather than ``__getattr__`` on unset slots: the same
    in a mypyc-compiled class (issue #24), where ``__getattr__`` is not called.
    """

    __slots__ = ("_instances", "_keys", "_locks")

    def __init__(self) -> None:
        self._instances: set[tuple[str, str]] | None = None
        self._keys: set[str] | None = None
        self._locks: set[str] | None = None

    @property
    def instances(self) -> set[tuple[str, str]]:
        if self._instances is None:
            self._instances = set()
        return self._instances

    @property
    def keys(self) -> set[str]:
        if self._keys is None:
            self._keys = set()
        return self._keys

    @property
    def locks(self) -> set[str]:
        if self._locks is None:
            self._locks = set()
        return self._locks


_LEASE_TTL_MASK: Final = (1 << model.LEASE_TTL_BITS) - 1

#: What an absent ``_attached`` entry means: nothing attached.  Only ever read
#: (``discard`` on its empty sets is a no-op); ``_attach`` creates real entries.
_NOTHING_ATTACHED: Final = _Attached()


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


#: Fixed cost counted per record, and per metadata pair or tag, on top of its characters: roughly
#: what CPython spends on a dict, its keys and small values (measured: an instance record with no
#: metadata is ~600 bytes with its index entries; a dict entry or list item ~100).
_RECORD_OVERHEAD_BYTES: Final = 512
_ITEM_OVERHEAD_BYTES: Final = 96


def _record_bytes(rec: Record) -> int:
    """A record's estimated memory for the state byte budget: deterministic (only its contents count)."""
    total = _RECORD_OVERHEAD_BYTES
    for value in rec.values():
        if type(value) is str:
            total += len(value)
        elif type(value) is dict:
            total += sum(len(k) + len(v) + _ITEM_OVERHEAD_BYTES for k, v in value.items())
        elif type(value) is list:
            total += sum(len(item) + _ITEM_OVERHEAD_BYTES for item in value)
    return total


def _public_token(rec: Record) -> dict[str, Any]:
    """A token as clients and events see it: never the secret hash."""
    return {k: (list(v) if k == "roles" else v) for k, v in rec.items() if k != "secret_hash"}


def _public_user(rec: Record | None) -> dict[str, Any] | None:
    if rec is None:
        return None
    return {"name": rec["name"], "roles": list(rec["roles"])}


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


_DEFAULT_LIMITS = StateLimits()


class RegistryState:
    """The replicated registry state.  See the module docstring for the contract."""

    __slots__ = (
        "_acl_bootstrapped",
        "_acl_roles",
        "_acl_token_by_hash",
        "_acl_tokens",
        "_acl_users",
        "_attached",
        "_budget_bytes",
        "_bytes",
        "_dedup",
        "_entry_term",
        "_epoch",
        "_identities",
        "_instances",
        "_intention_default",
        "_intentions",
        "_keys",
        "_lease_owners",
        "_leases",
        "_limits",
        "_locks",
        "_next_lease",
        "_revision",
        "_services",
    )

    def __init__(self, limits: StateLimits | None = None) -> None:
        #: Replicated limits: every replica must be built with the same ones.
        self._limits = limits if limits is not None else _DEFAULT_LIMITS
        self._revision = 0
        self._epoch = 0
        #: The Raft term of the log entry being applied (None outside Raft: tests, the jepsen model).
        self._entry_term: int | None = None
        self._next_lease = 1
        self._services: dict[str, Record] = {}
        self._instances: dict[str, dict[str, Record]] = {}
        #: lease id -> model.lease_pack(ttl_ms, granted_ms)
        self._leases: dict[int, int] = {}
        #: Only leases that carry something (see the module docstring).
        self._attached: dict[int, _Attached] = {}
        #: lease id -> id of the token that granted it (only leases granted with ACLs on).
        self._lease_owners: dict[int, str] = {}
        self._keys: dict[str, Record] = {}
        self._locks: dict[str, Record] = {}
        #: Estimated bytes of services, instances and keys (see ``_record_bytes``), held under
        #: ``limits.state_bytes_max``.
        self._bytes = 0
        #: The byte budget the newest leader announced (``leader_epoch``); None until one did: then
        #: ``limits.state_bytes_max``.  Replicated, so every replica refuses the same writes even if
        #: the nodes' ``--max-state-bytes`` differ.
        self._budget_bytes: int | None = None
        # OrderedDict, not dict: popitem(last=False) is O(1), whereas evicting
        # the first key of a plain dict degrades to O(n) between resizes.
        #: (caller's token hash or "", rid) -> outcome, oldest first.
        self._dedup: OrderedDict[tuple[str, str], _Outcome] = OrderedDict()
        # ACL tables (see registry.fsm.acl).  _acl_token_by_hash is a derived index, not in the snapshot.
        self._acl_bootstrapped = False
        self._acl_tokens: dict[str, Record] = {}
        self._acl_token_by_hash: dict[str, Record] = {}
        self._acl_roles: dict[str, Record] = {}
        self._acl_users: dict[str, Record] = {}
        self._intentions: dict[str, Record] = {}
        self._intention_default: str = INTENTION_DEFAULT
        #: Raft address -> incarnation of each member's data directory (registry.raft.incarnation).
        #: Cluster metadata, not user data: no revision, no events.
        self._identities: dict[str, str] = {}

    # ------------------------------------------------------------------ props

    @property
    def revision(self) -> int:
        return self._revision

    @property
    def limits(self) -> StateLimits:
        return self._limits

    @property
    def epoch(self) -> int:
        return self._epoch

    # ------------------------------------------------------------------ apply

    def apply(self, command: object, *, trusted: bool = False, entry_term: int | None = None) -> Applied:
        """Validate, de-duplicate and apply one command.

        ``trusted``: the command came through the Raft log, so it was validated
        where it was proposed; only the structural guard runs (module docstring).
        ``entry_term``: the Raft term of the log entry that carries the command
        (as hashicorp's ``FSM.Apply(*Log)`` gets it); every replica sees the
        same one, so rules that use it stay deterministic.
        The caller must not keep or mutate it: its containers become the state's.
        """
        self._entry_term = entry_term
        if trusted and type(command) is dict and is_normalised(command):
            cmd = command
        else:
            cmd = validate_command(command)
        op: str = cmd["op"]
        rid: str | None = cmd["rid"]
        if op in _UNRECORDED_OPS:
            rid = None
        auth: str | None = cmd["auth"]
        dedup_key = (auth or "", rid) if rid is not None else None
        if dedup_key is not None:
            seen = self._dedup.get(dedup_key)
            if seen is not None:
                if seen.error is not None:
                    raise seen.error(seen.message)
                assert seen.result is not None
                return Applied(_copy_result(seen.result), [])
        before = self._revision
        if auth is not None:
            # Stamped by the receiving node with ACLs on: authorize against the state as of this
            # log position, so a token revoked before the command commits fails on every replica.
            # A refusal here is not remembered (module docstring: de-duplication).
            need = acl.op_permission(op, cmd)
            if need is not None:
                self.acl_authorize(auth, need[0], need[1], cmd["now_ms"])
        try:
            result, events = _HANDLERS[op](self, cmd)
        except RegistryError as err:
            assert self._revision == before, "a failing command changed the revision"
            if dedup_key is not None:
                self._remember(dedup_key, _Outcome(None, type(err), err.message))
            raise
        assert self._revision - before in (0, 1), "a command bumped the revision more than once"
        assert result["revision"] == self._revision
        if dedup_key is not None:
            self._remember(dedup_key, _Outcome(_copy_result(result), None, ""))
        return Applied(result, events)

    def _remember(self, key: tuple[str, str], outcome: _Outcome) -> None:
        self._dedup[key] = outcome
        if len(self._dedup) > self._limits.dedup_entries_max:
            self._dedup.popitem(last=False)

    @property
    def state_bytes(self) -> int:
        """Estimated bytes of services, instances and keys (the budget ``limits.state_bytes_max`` bounds)."""
        return self._bytes

    @property
    def state_bytes_budget(self) -> int:
        """The byte budget in force: the newest leader's announced one, else ``limits.state_bytes_max``."""
        return self._budget_bytes if self._budget_bytes is not None else self._limits.state_bytes_max

    def _check_growth(self, grow_bytes: int, what: str) -> None:
        """Refuse a change that would take the state past its byte budget (shrinking always passes)."""
        budget = self.state_bytes_budget
        if grow_bytes > 0 and self._bytes + grow_bytes > budget:
            raise LimitExceeded(f"{what} would take the state past its budget of {budget} "
                                f"bytes (state_bytes_max; about {self._bytes} used): delete something first")

    def _count_bytes(self) -> int:
        total = sum(_record_bytes(rec) for rec in self._services.values())
        total += sum(_record_bytes(rec) for insts in self._instances.values() for rec in insts.values())
        return total + sum(_record_bytes(rec) for rec in self._keys.values())

    def _bump(self) -> int:
        """Take the one new revision of the current command (after all checks)."""
        rev = self._revision + 1
        assert rev > self._revision
        self._revision = rev
        return rev

    def _attach(self, lease: int) -> _Attached:
        """The attachment entry of a live lease, created on first use."""
        att = self._attached.get(lease)
        if att is None:
            att = self._attached[lease] = _Attached()
        return att

    def _lease_record(self, lease: int) -> Record:
        packed = self._leases[lease]
        return model.lease_record(lease, model.lease_ttl_ms(packed), model.lease_granted_ms(packed))

    def _check_lease_exists(self, lease: int | None) -> None:
        if lease is not None and lease not in self._leases:
            raise NotFound(f"lease {lease} not found")

    def _check_lease_use(self, cmd: dict[str, Any], lease: int | None, what: str) -> None:
        """With ACLs on (the node stamped ``auth``), a live lease is used only by its owner or ``admin`` on lease."""
        auth: str | None = cmd["auth"]
        if lease is not None and auth is not None and lease in self._leases:
            self.lease_use_check(auth, lease, what)

    def lease_use_check(self, secret_hash: str, lease: int, what: str) -> None:
        """Raise PermissionDenied unless the token may use ``lease`` (keepalive, revoke, attach, release).

        A lease belongs to the token that granted it: lease ids count up from 1,
        so without this any token with ``write`` on ``lease`` could revoke
        another's lease (deregistering its instances, deleting its keys and
        locks) or keep a dead one alive.  ``admin`` on ``lease`` may use any; a
        lease granted with ACLs off has no owner and needs ``admin``.
        """
        token = self._acl_token_by_hash.get(secret_hash)
        if token is None:
            raise Unauthenticated("unknown or expired token")
        if self._lease_owners.get(lease) == token["id"]:
            return
        if acl.allowed(acl.token_rules(self._acl_roles, token), "admin", "lease"):
            return
        raise PermissionDenied(f"lease {lease} belongs to another token: {what} needs the token that granted it "
                               "or admin on lease")

    # ------------------------------------------------------------------ services / instances

    def _op_service_put(self, cmd: dict[str, Any]) -> tuple[dict[str, Any], list[Record]]:
        name = cmd["name"]
        old = self._services.get(name)
        if old is None and len(self._services) >= self._limits.services_max:
            raise LimitExceeded(f"at most {self._limits.services_max} services")
        rev = self._revision + 1
        new = model.service_record(
            name, cmd["meta"], cmd["tags"], rev if old is None else old["create_revision"], rev
        )
        grow = _record_bytes(new) - (0 if old is None else _record_bytes(old))
        self._check_growth(grow, f"service {name!r}")
        assert self._bump() == rev
        self._bytes += grow
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
                self._attached.get(rec["lease"], _NOTHING_ATTACHED).instances.discard((name, iid))
            events.append(_event(rev, "delete", "instance", name, iid, rec, None))
            self._bytes -= _record_bytes(rec)
        del self._services[name]
        self._bytes -= _record_bytes(old)
        events.append(_event(rev, "delete", "service", name, None, old, None))
        return {"revision": rev, "instances": len(insts)}, events

    def _op_register(self, cmd: dict[str, Any]) -> tuple[dict[str, Any], list[Record]]:
        svc, iid, lease = cmd["service"], cmd["id"], cmd["lease"]
        self._check_lease_exists(lease)
        self._check_lease_use(cmd, lease, "attaching an instance")
        insts = self._instances.get(svc)
        old = None if insts is None else insts.get(iid)
        guard = cmd["if_mod_revision"]
        if guard is not None:
            current = 0 if old is None else old["mod_revision"]
            if current != guard:
                raise _guard_failed(f"instance {svc}/{iid}", current, guard)
        if insts is None:
            if len(self._services) >= self._limits.services_max:
                raise LimitExceeded(f"at most {self._limits.services_max} services")
        elif old is None and len(insts) >= self._limits.instances_per_service_max:
            raise LimitExceeded(f"at most {self._limits.instances_per_service_max} instances per service")
        rev = self._revision + 1
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
        service = model.service_record(svc, {}, [], rev, rev) if insts is None else None
        grow = (_record_bytes(new) - (0 if old is None else _record_bytes(old))
                + (0 if service is None else _record_bytes(service)))
        self._check_growth(grow, f"instance {svc}/{iid}")
        assert self._bump() == rev
        self._bytes += grow
        events = []
        if service is not None:
            self._services[svc] = service
            insts = self._instances[svc] = {}
            events.append(_event(rev, "put", "service", svc, None, None, service))
        assert insts is not None
        insts[iid] = new
        old_lease = None if old is None else old["lease"]
        if old_lease != lease:
            if old_lease is not None:
                self._attached.get(old_lease, _NOTHING_ATTACHED).instances.discard((svc, iid))
            if lease is not None:
                self._attach(lease).instances.add((svc, iid))
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
        self._bytes -= _record_bytes(old)
        if old["lease"] is not None:
            self._attached.get(old["lease"], _NOTHING_ATTACHED).instances.discard((svc, iid))
        return {"revision": rev}, [_event(rev, "delete", "instance", svc, iid, old, None)]

    def _op_set_status(self, cmd: dict[str, Any]) -> tuple[dict[str, Any], list[Record]]:
        svc, iid, status = cmd["service"], cmd["id"], cmd["status"]
        insts, old = self._find_instance(svc, iid)
        if old["status"] == status:
            # Health checks re-report the same status constantly: not a change.
            return {"revision": self._revision, "changed": False}, []
        rev = self._bump()
        new = {**old, "status": status, "mod_revision": rev}
        # The note (check output) of the last status change is kept with the record, so `service get`
        # shows why an instance is critical; only while there is one: most records carry none.
        # A repeat of the same status changes nothing (above), so a check whose output varies
        # costs no write for it.
        if cmd["note"]:
            new["note"] = cmd["note"]
        else:
            new.pop("note", None)
        insts[iid] = new
        # Accounted but never refused: a health change must always get through, and a note is bounded.
        self._bytes += _record_bytes(new) - _record_bytes(old)
        event = _event(rev, "status", "instance", svc, iid, old, new)
        event["note"] = cmd["note"]
        return {"revision": rev, "changed": True}, [event]

    # ------------------------------------------------------------------ leases

    def _op_lease_grant(self, cmd: dict[str, Any]) -> tuple[dict[str, Any], list[Record]]:
        if len(self._leases) >= self._limits.leases_max:
            raise LimitExceeded(f"at most {self._limits.leases_max} leases")
        lease = self._next_lease
        if lease > model.INT_MAX:
            raise LimitExceeded("lease id space exhausted")
        ttl_ms = cmd["ttl_ms"]
        owner = None
        if cmd["auth"] is not None:
            token = self._acl_token_by_hash.get(cmd["auth"])
            if token is None:
                raise Unauthenticated("unknown or expired token")
            owner = token["id"]
        rev = self._bump()
        self._next_lease = lease + 1
        self._leases[lease] = model.lease_pack(ttl_ms, cmd["now_ms"])
        if owner is not None:
            self._lease_owners[lease] = owner
        rec = model.lease_record(lease, ttl_ms, cmd["now_ms"])
        return {"revision": rev, "lease": lease, "ttl_ms": ttl_ms}, [
            _event(rev, "put", "lease", None, str(lease), None, rec)
        ]

    def _drop_lease(self, lease: int, rev: int, type_: str, events: list[Record]) -> _Attached:
        """Remove a lease and everything attached to it; append the events."""
        att = self._attached.pop(lease, _NOTHING_ATTACHED)
        rec = self._lease_record(lease)
        del self._leases[lease]
        self._lease_owners.pop(lease, None)
        for svc, iid in sorted(att.instances):
            old = self._instances[svc].pop(iid)
            self._bytes -= _record_bytes(old)
            events.append(_event(rev, type_, "instance", svc, iid, old, None))
        for key in sorted(att.keys):
            old = self._keys.pop(key)
            self._bytes -= _record_bytes(old)
            events.append(_event(rev, type_, "key", None, key, old, None))
        for name in sorted(att.locks):
            events.append(_event(rev, type_, "lock", None, name, self._locks.pop(name), None))
        events.append(_event(rev, type_, "lease", None, str(lease), rec, None))
        return att

    def _op_lease_revoke(self, cmd: dict[str, Any]) -> tuple[dict[str, Any], list[Record]]:
        lease = cmd["lease"]
        self._check_lease_exists(lease)
        self._check_lease_use(cmd, lease, "revoking it")
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
        if epoch < self._epoch or (self._entry_term is not None and epoch != self._entry_term):
            # Proposed by a deposed leader whose deadlines may be stale; or carried by
            # an entry of another term (a deposed leader's expiry, forwarded to the new
            # leader before its epoch announcement committed): only the leader whose
            # term the entry carries may expire leases.
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
        epoch, budget = cmd["epoch"], cmd["state_bytes_max"]
        if budget is not None and epoch >= self._epoch:
            # The newest leader's budget governs; a stale announcement changes nothing.
            self._budget_bytes = budget
        self._epoch = max(self._epoch, epoch)
        return {"revision": self._revision, "epoch": self._epoch, "state_bytes_max": self.state_bytes_budget}, []

    # ------------------------------------------------------------------ member identities

    def _op_identity_put(self, cmd: dict[str, Any]) -> tuple[dict[str, Any], list[Record]]:
        raft, incarnation = cmd["raft"], cmd["incarnation"]
        current = self._identities.get(raft)
        if cmd["mode"] == "create" and current is not None and current != incarnation:
            raise Conflict(f"member {raft} already has identity {current}")
        if current is None and len(self._identities) >= IDENTITIES_MAX:
            raise LimitExceeded(f"at most {IDENTITIES_MAX} member identities")
        self._identities[raft] = incarnation
        return {"revision": self._revision}, []

    def _op_identity_delete(self, cmd: dict[str, Any]) -> tuple[dict[str, Any], list[Record]]:
        removed = self._identities.pop(cmd["raft"], None)
        return {"revision": self._revision, "deleted": removed is not None}, []

    def identity(self, raft: str) -> str | None:
        """The recorded incarnation of the member at Raft address ``raft``, or None."""
        return self._identities.get(raft)

    def identities(self) -> dict[str, str]:
        return dict(self._identities)

    def forget_identities(self) -> int:
        """Drop every recorded member identity; returns how many.

        Only for a state that is not yet replicated (a restored backup about
        to seed a new cluster, whose nodes have new data directories): every
        node that loads the same seed drops the same records.
        """
        count = len(self._identities)
        self._identities.clear()
        return count

    # ------------------------------------------------------------------ KV

    def _op_key_put(self, cmd: dict[str, Any]) -> tuple[dict[str, Any], list[Record]]:
        key, lease = cmd["key"], cmd["lease"]
        self._check_lease_exists(lease)
        self._check_lease_use(cmd, lease, "attaching a key")
        old = self._keys.get(key)
        guard = cmd["if_mod_revision"]
        if guard is not None:
            current = 0 if old is None else old["mod_revision"]
            if current != guard:
                raise _guard_failed(f"key {key!r}", current, guard)
        if old is None and len(self._keys) >= self._limits.keys_max:
            raise LimitExceeded(f"at most {self._limits.keys_max} keys")
        rev = self._revision + 1
        new = model.key_record(key, cmd["value"], lease, rev if old is None else old["create_revision"], rev)
        grow = _record_bytes(new) - (0 if old is None else _record_bytes(old))
        self._check_growth(grow, f"key {key!r}")
        assert self._bump() == rev
        self._bytes += grow
        self._keys[key] = new
        old_lease = None if old is None else old["lease"]
        if old_lease != lease:
            if old_lease is not None:
                self._attached.get(old_lease, _NOTHING_ATTACHED).keys.discard(key)
            if lease is not None:
                self._attach(lease).keys.add(key)
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
        self._bytes -= _record_bytes(old)
        if old["lease"] is not None:
            self._attached.get(old["lease"], _NOTHING_ATTACHED).keys.discard(key)
        return {"revision": rev}, [_event(rev, "delete", "key", None, key, old, None)]

    # ------------------------------------------------------------------ locks

    def _op_lock_acquire(self, cmd: dict[str, Any]) -> tuple[dict[str, Any], list[Record]]:
        name, lease = cmd["name"], cmd["lease"]
        self._check_lease_exists(lease)
        self._check_lease_use(cmd, lease, "taking a lock")
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
        self._attach(lease).locks.add(name)
        return {"revision": rev, "token": rev, "acquired": True}, [
            _event(rev, "put", "lock", None, name, None, rec)
        ]

    def _op_lock_release(self, cmd: dict[str, Any]) -> tuple[dict[str, Any], list[Record]]:
        name, lease = cmd["name"], cmd["lease"]
        cur = self._locks.get(name)
        if cur is None or cur["lease"] != lease:
            raise NotFound(f"lock {name!r} is not held by lease {lease}")
        self._check_lease_use(cmd, lease, "releasing a lock")
        rev = self._bump()
        del self._locks[name]
        self._attached.get(lease, _NOTHING_ATTACHED).locks.discard(name)
        return {"revision": rev}, [_event(rev, "delete", "lock", None, name, cur, None)]

    def _op_barrier(self, cmd: dict[str, Any]) -> tuple[dict[str, Any], list[Record]]:
        return {"revision": self._revision}, []

    # ------------------------------------------------------------------ ACLs and intentions

    def acl_authorize(self, secret_hash: str | None, verb: str, resource: str | None,
                      now_ms: int | None) -> dict[str, Any]:
        """The public token record if it may ``verb`` ``resource``; raises Unauthenticated/PermissionDenied."""
        token = acl.authorize(self._acl_token_by_hash, self._acl_roles, secret_hash, verb, resource, now_ms)
        return _public_token(dict(token))

    def acl_may(self, secret_hash: str | None, verb: str, resource: str, now_ms: int | None) -> bool:
        try:
            acl.authorize(self._acl_token_by_hash, self._acl_roles, secret_hash, verb, resource, now_ms)
        except RegistryError:
            return False
        return True

    @property
    def acl_bootstrapped(self) -> bool:
        return self._acl_bootstrapped

    def _check_roles_exist(self, roles: list[str]) -> None:
        for name in roles:
            if name != acl.MANAGEMENT_ROLE and name not in self._acl_roles:
                raise NotFound(f"role {name!r} not found")

    def _add_token(self, cmd: dict[str, Any], roles: list[str], description: str,
                   expires_ms: int | None, login: str = "") -> tuple[dict[str, Any], list[Record]]:
        """Add a token, first removing expired ones and the user's oldest login tokens over the cap.

        Tokens only accumulate through creation, so creation is where they are reaped: by
        this command's ``now_ms``, so every replica removes the same ones.
        """
        token_id, secret_hash = cmd["token_id"], cmd["secret_hash"]
        if token_id in self._acl_tokens or secret_hash in self._acl_token_by_hash:
            raise Conflict(f"token {token_id!r} already exists")
        doomed = self._tokens_to_reap(cmd["now_ms"], login)
        if len(self._acl_tokens) - len(doomed) >= ACL_TOKENS_MAX:
            raise LimitExceeded(f"at most {ACL_TOKENS_MAX} tokens")
        rev = self._bump()
        events: list[Record] = []
        for old_id in doomed:
            old = self._acl_tokens.pop(old_id)
            del self._acl_token_by_hash[old["secret_hash"]]
            events.append(_event(rev, "delete", "acl_token", None, old_id, _public_token(old), None))
        rec = {
            "id": token_id,
            "secret_hash": secret_hash,
            "roles": roles,
            "description": description,
            "expires_ms": expires_ms,
            "create_revision": rev,
        }
        if login:
            rec["login"] = login
        self._acl_tokens[token_id] = rec
        self._acl_token_by_hash[secret_hash] = rec
        events.append(_event(rev, "put", "acl_token", None, token_id, None, _public_token(rec)))
        return {"revision": rev, "id": token_id, "removed": len(doomed)}, events

    def _tokens_to_reap(self, now_ms: int | None, login: str) -> list[str]:
        """Ids to remove before adding a token: expired ones (oldest expiry first, bounded), then
        ``login``'s oldest login tokens beyond ``LOGIN_TOKENS_PER_USER_MAX - 1``."""
        doomed: list[str] = []
        if now_ms is not None:
            expired = sorted((rec["expires_ms"], tid) for tid, rec in self._acl_tokens.items()
                             if rec["expires_ms"] is not None and rec["expires_ms"] <= now_ms)
            doomed = [tid for _, tid in expired[:EXPIRED_TOKENS_PER_COMMAND_MAX]]
        if login:
            gone = set(doomed)
            mine = sorted((rec["create_revision"], tid) for tid, rec in self._acl_tokens.items()
                          if rec.get("login") == login and tid not in gone)
            excess = len(mine) - (LOGIN_TOKENS_PER_USER_MAX - 1)
            if excess > 0:
                doomed.extend(tid for _, tid in mine[:excess])
        return doomed

    def _op_acl_bootstrap(self, cmd: dict[str, Any]) -> tuple[dict[str, Any], list[Record]]:
        if self._acl_bootstrapped:
            raise Conflict("ACLs are already bootstrapped: the management token was issued once")
        result, events = self._add_token(cmd, [acl.MANAGEMENT_ROLE], "bootstrap management token", None)
        self._acl_bootstrapped = True
        return result, events

    def _op_acl_token_create(self, cmd: dict[str, Any]) -> tuple[dict[str, Any], list[Record]]:
        self._check_roles_exist(cmd["roles"])
        return self._add_token(cmd, cmd["roles"], cmd["description"], cmd["expires_ms"], cmd["login"])

    def _op_acl_token_delete(self, cmd: dict[str, Any]) -> tuple[dict[str, Any], list[Record]]:
        token_id = cmd["token_id"]
        old = self._acl_tokens.get(token_id)
        if old is None:
            raise NotFound(f"token {token_id!r} not found")
        rev = self._bump()
        del self._acl_tokens[token_id]
        del self._acl_token_by_hash[old["secret_hash"]]
        return {"revision": rev}, [_event(rev, "delete", "acl_token", None, token_id, _public_token(old), None)]

    def _op_acl_role_put(self, cmd: dict[str, Any]) -> tuple[dict[str, Any], list[Record]]:
        name = cmd["name"]
        if name == acl.MANAGEMENT_ROLE:
            raise Conflict(f"role {name!r} is builtin")
        old = self._acl_roles.get(name)
        if old is None and len(self._acl_roles) >= ACL_ROLES_MAX:
            raise LimitExceeded(f"at most {ACL_ROLES_MAX} roles")
        rev = self._bump()
        new = {"name": name, "rules": [acl.parse_rule(text) for text in cmd["rules"]]}
        self._acl_roles[name] = new
        return {"revision": rev, "created": old is None}, [_event(rev, "put", "acl_role", None, name, old, new)]

    def _op_acl_role_delete(self, cmd: dict[str, Any]) -> tuple[dict[str, Any], list[Record]]:
        name = cmd["name"]
        old = self._acl_roles.get(name)
        if old is None:
            raise NotFound(f"role {name!r} not found")
        rev = self._bump()
        del self._acl_roles[name]
        return {"revision": rev}, [_event(rev, "delete", "acl_role", None, name, old, None)]

    def _op_acl_user_put(self, cmd: dict[str, Any]) -> tuple[dict[str, Any], list[Record]]:
        name = cmd["name"]
        self._check_roles_exist(cmd["roles"])
        old = self._acl_users.get(name)
        if old is None and len(self._acl_users) >= ACL_USERS_MAX:
            raise LimitExceeded(f"at most {ACL_USERS_MAX} users")
        rev = self._bump()
        new = {"name": name, "password_hash": cmd["password_hash"], "roles": cmd["roles"]}
        self._acl_users[name] = new
        return {"revision": rev, "created": old is None}, [
            _event(rev, "put", "acl_user", None, name, _public_user(old), _public_user(new))
        ]

    def _op_acl_user_delete(self, cmd: dict[str, Any]) -> tuple[dict[str, Any], list[Record]]:
        name = cmd["name"]
        old = self._acl_users.get(name)
        if old is None:
            raise NotFound(f"user {name!r} not found")
        rev = self._bump()
        del self._acl_users[name]
        return {"revision": rev}, [_event(rev, "delete", "acl_user", None, name, _public_user(old), None)]

    def _op_intention_put(self, cmd: dict[str, Any]) -> tuple[dict[str, Any], list[Record]]:
        key = f"{cmd['source']}->{cmd['destination']}"
        old = self._intentions.get(key)
        if old is None and len(self._intentions) >= INTENTIONS_MAX:
            raise LimitExceeded(f"at most {INTENTIONS_MAX} intentions")
        rev = self._bump()
        new = {"source": cmd["source"], "destination": cmd["destination"], "action": cmd["action"]}
        self._intentions[key] = new
        return {"revision": rev, "created": old is None}, [_event(rev, "put", "intention", None, key, old, new)]

    def _op_intention_delete(self, cmd: dict[str, Any]) -> tuple[dict[str, Any], list[Record]]:
        key = f"{cmd['source']}->{cmd['destination']}"
        old = self._intentions.get(key)
        if old is None:
            raise NotFound(f"intention {key} not found")
        rev = self._bump()
        del self._intentions[key]
        return {"revision": rev}, [_event(rev, "delete", "intention", None, key, old, None)]

    def _op_intention_default_set(self, cmd: dict[str, Any]) -> tuple[dict[str, Any], list[Record]]:
        action = cmd["action"]
        if action == self._intention_default:
            return {"revision": self._revision, "changed": False}, []
        rev = self._bump()
        old = {"default": self._intention_default}
        self._intention_default = action
        return {"revision": rev, "changed": True}, [
            _event(rev, "put", "intention", None, "*", old, {"default": action})
        ]

    def acl_token_list(self) -> list[dict[str, Any]]:
        return [_public_token(self._acl_tokens[t]) for t in sorted(self._acl_tokens)]

    def acl_token_by_hash(self, secret_hash: str) -> dict[str, Any] | None:
        rec = self._acl_token_by_hash.get(secret_hash)
        return None if rec is None else _public_token(rec)

    def acl_role_list(self) -> list[dict[str, Any]]:
        return [
            {"name": n, "rules": [dict(r, verbs=list(r["verbs"])) for r in self._acl_roles[n]["rules"]]}
            for n in sorted(self._acl_roles)
        ]

    def acl_user_list(self) -> list[dict[str, Any]]:
        return [_public_user(self._acl_users[n]) for n in sorted(self._acl_users)]  # type: ignore[misc]

    def acl_user_secret(self, name: str) -> tuple[str, list[str]] | None:
        """(password hash, roles) of a user, for the node's login; never sent to a client."""
        rec = self._acl_users.get(name)
        return None if rec is None else (rec["password_hash"], list(rec["roles"]))

    def intention_list(self) -> dict[str, Any]:
        return {"default": self._intention_default,
                "intentions": [dict(self._intentions[k]) for k in sorted(self._intentions)]}

    def intention_check(self, source: str, destination: str) -> dict[str, Any]:
        rec = self._intentions.get(f"{source}->{destination}")
        if rec is not None:
            return {"action": rec["action"], "matched": f"{source}->{destination}"}
        return {"action": self._intention_default, "matched": None}

    # ------------------------------------------------------------------ queries (pure)

    # Query arguments come from request frames: typed ``object`` and checked here, so a
    # compiled (mypyc) build raises the same BadRequest rather than a TypeError (#24).

    def get_service(self, name: object) -> dict[str, Any]:
        svc_name = _arg_str("name", name)
        svc = self._services.get(svc_name)
        if svc is None:
            raise NotFound(f"service {svc_name!r} not found")
        insts = self._instances[svc_name]
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
                    # What `regctl service list` shows as TAGS: instances carry the tags, services rarely do.
                    "instance_tags": sorted({t for i in insts.values() for t in i["tags"]}),
                }
            )
        return out

    def get_instance(self, service: object, id: object) -> dict[str, Any]:
        _, rec = self._find_instance(_arg_str("service", service), _arg_str("id", id))
        return _copy_record(rec)

    def services_with_instance(self, id: object) -> list[str]:
        """The services (sorted) that have an instance with this id: one dict lookup per service.

        Consul's agent endpoints name an instance by id alone (``service:<id>``).
        """
        iid = _arg_str("id", id)
        return sorted(name for name, insts in self._instances.items() if iid in insts)

    def get_lease(self, lease_id: object) -> dict[str, Any]:
        lease = _arg_lease(lease_id)
        if lease not in self._leases:
            raise NotFound(f"lease {lease} not found")
        att = self._attached.get(lease, _NOTHING_ATTACHED)
        return {
            **self._lease_record(lease),
            "instances": [list(pair) for pair in sorted(att.instances)],
            "locks": sorted(att.locks),
            "keys": sorted(att.keys),
        }

    def list_leases(self) -> list[dict[str, Any]]:
        """Leases sorted by id, with attachment *counts* (get_lease has the lists)."""
        out = []
        for lease in sorted(self._leases):
            att = self._attached.get(lease, _NOTHING_ATTACHED)
            out.append(
                {
                    **self._lease_record(lease),
                    "instances": len(att.instances),
                    "locks": len(att.locks),
                    "keys": len(att.keys),
                }
            )
        return out

    def lease_ttls(self) -> dict[int, int]:
        ttl_ms = model.lease_ttl_ms
        return {lease: ttl_ms(packed) for lease, packed in self._leases.items()}

    def lease_ttl_ms(self, lease: int) -> int | None:
        """The TTL of a live lease, None if there is none (the leader's keepalive path: one lookup)."""
        packed = self._leases.get(lease)
        # model.lease_ttl_ms inlined: this runs once per lease id in every keepalive frame.
        return None if packed is None else packed & _LEASE_TTL_MASK

    def lease_count(self) -> int:
        return len(self._leases)

    def get_key(self, key: object) -> dict[str, Any]:
        name = _arg_str("key", key)
        rec = self._keys.get(name)
        if rec is None:
            raise NotFound(f"key {name!r} not found")
        return dict(rec)

    def list_keys(self, prefix: object = "") -> list[dict[str, Any]]:
        start = _arg_str("prefix", prefix)
        return [dict(self._keys[k]) for k in sorted(k for k in self._keys if k.startswith(start))]

    def get_lock(self, name: object) -> dict[str, Any]:
        lock = _arg_str("name", name)
        rec = self._locks.get(lock)
        if rec is None:
            raise NotFound(f"lock {lock!r} is free")
        return dict(rec)

    # ------------------------------------------------------------------ snapshot / restore

    def snapshot(self) -> bytes:
        """The whole state as canonical msgpack bytes (equal states -> equal bytes)."""
        instances: list[Record] = []
        for name in sorted(self._instances):
            insts = self._instances[name]
            instances.extend(insts[i] for i in sorted(insts))
        dedup: list[list[Any]] = []
        for (owner, rid), outcome in self._dedup.items():
            if outcome.error is None:
                entry: list[Any] = [rid, {"result": outcome.result}]
            else:
                entry = [rid, {"error": outcome.error.code, "message": outcome.message}]
            if owner:
                entry.append(owner)  # [rid, outcome] as before for callers without a token
            dedup.append(entry)
        obj = {
            "format": SNAPSHOT_FORMAT,
            "revision": self._revision,
            "epoch": self._epoch,
            "next_lease": self._next_lease,
            "services": [self._services[n] for n in sorted(self._services)],
            "instances": instances,
            "leases": [self._lease_record(n) for n in sorted(self._leases)],
            "keys": [self._keys[n] for n in sorted(self._keys)],
            "locks": [self._locks[n] for n in sorted(self._locks)],
            "dedup": dedup,
        }
        acl_obj = self._acl_snapshot()
        if acl_obj is not None:
            obj["acl"] = acl_obj
        if self._identities:
            obj["identities"] = [[raft, self._identities[raft]] for raft in sorted(self._identities)]
        if self._lease_owners:
            obj["lease_owners"] = [[lease, self._lease_owners[lease]] for lease in sorted(self._lease_owners)]
        if self._budget_bytes is not None:
            obj["state_bytes_max"] = self._budget_bytes
        data: bytes = msgpack.packb(obj, use_bin_type=True)
        return data

    @classmethod
    def restore(cls, data: object, limits: StateLimits | None = None) -> RegistryState:
        """Rebuild a state from ``snapshot()`` bytes; BadRequest on corrupt/foreign data."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise BadRequest(f"snapshot must be bytes, got {type(data).__name__}")
        try:
            obj = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
        except Exception as exc:  # msgpack signals corruption with many exception types
            raise BadRequest(f"corrupt snapshot: {type(exc).__name__}: {exc}"[:200]) from None
        try:
            return cls._from_snapshot_obj(obj, limits)
        except BadRequest as exc:
            raise BadRequest(f"corrupt snapshot: {exc.message}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            # Defensive: any shape the checks below missed is still just bad data.
            raise BadRequest(f"corrupt snapshot: {type(exc).__name__}: {exc}"[:200]) from None

    @classmethod
    def _from_snapshot_obj(cls, obj: Any, limits: StateLimits | None) -> RegistryState:
        if not isinstance(obj, dict):
            raise BadRequest("not a registry snapshot")
        fmt = obj.get("format")
        if type(fmt) is not int or fmt != SNAPSHOT_FORMAT:
            raise BadRequest(f"unsupported snapshot format {fmt!r:.40}")
        if not _SNAPSHOT_KEYS <= set(obj) <= _SNAPSHOT_KEYS | _SNAPSHOT_OPTIONAL_KEYS:
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

        st = cls(limits)
        st._revision = revision = snap_int("revision", 0)
        st._epoch = snap_int("epoch", 0)
        st._next_lease = snap_int("next_lease", 1)
        if "state_bytes_max" in obj:
            st._budget_bytes = model.check_state_bytes_max("state_bytes_max", snap_int("state_bytes_max", 0))

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
            st._leases[lease] = model.lease_pack(rec["ttl_ms"], rec["granted_ms"])
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
                st._attach(lease).instances.add((svc, iid))
        for raw in snap_list("keys"):
            rec = model.parse_key_record(raw)
            key, lease = rec["key"], rec["lease"]
            if key in st._keys:
                raise BadRequest(f"duplicate key {key!r}")
            check_lease(f"key {key!r}", lease)
            check_rev(f"key {key!r}", rec)
            st._keys[key] = rec
            if lease is not None:
                st._attach(lease).keys.add(key)
        for raw in snap_list("locks"):
            rec = model.parse_lock_record(raw)
            name, lease = rec["name"], rec["lease"]
            if name in st._locks:
                raise BadRequest(f"duplicate lock {name!r}")
            check_lease(f"lock {name!r}", lease)
            check_rev(f"lock {name!r}", rec, "create_revision")
            st._locks[name] = rec
            st._attach(lease).locks.add(name)
        dedup = snap_list("dedup")
        if len(dedup) > st._limits.dedup_entries_max:
            raise BadRequest(f"dedup table has {len(dedup)} entries, at most {st._limits.dedup_entries_max}")
        for entry in dedup:
            key, outcome = cls._parse_dedup_entry(entry, revision)
            rid = key[1]
            if key in st._dedup:
                raise BadRequest(f"duplicate request id {rid!r}")
            st._dedup[key] = outcome
        if "acl" in obj:
            st._restore_acl(obj["acl"], revision)
        if "identities" in obj:
            entries = snap_list("identities")
            if len(entries) > IDENTITIES_MAX:
                raise BadRequest(f"{len(entries)} member identities, at most {IDENTITIES_MAX}")
            for entry in entries:
                if not (isinstance(entry, list) and len(entry) == 2 and all(type(x) is str for x in entry)):
                    raise BadRequest("member identity entries must be [raft address, incarnation]")
                raft = model.check_key("identities", entry[0])
                if raft in st._identities:
                    raise BadRequest(f"duplicate member identity {raft!r}")
                st._identities[raft] = model.check_incarnation("identities", entry[1])
        st._bytes = st._count_bytes()
        if "lease_owners" in obj:
            for entry in snap_list("lease_owners"):
                if not (isinstance(entry, list) and len(entry) == 2 and type(entry[0]) is int
                        and type(entry[1]) is str):
                    raise BadRequest("lease owner entries must be [lease id, token id]")
                lease, owner = entry
                check_lease("lease owner", lease)
                if lease in st._lease_owners:
                    raise BadRequest(f"duplicate owner of lease {lease}")
                try:
                    st._lease_owners[lease] = acl.check_id("lease owner", owner)
                except RegistryError as err:
                    raise BadRequest(err.message) from None
        st.check_invariants()
        return st

    def _acl_snapshot(self) -> dict[str, Any] | None:
        if not (self._acl_bootstrapped or self._acl_tokens or self._acl_roles or self._acl_users
                or self._intentions or self._intention_default != INTENTION_DEFAULT):
            return None
        return {
            "bootstrapped": self._acl_bootstrapped,
            "tokens": [self._acl_tokens[t] for t in sorted(self._acl_tokens)],
            "roles": [self._acl_roles[n] for n in sorted(self._acl_roles)],
            "users": [self._acl_users[n] for n in sorted(self._acl_users)],
            "intentions": [self._intentions[k] for k in sorted(self._intentions)],
            "intention_default": self._intention_default,
        }

    def _restore_acl(self, obj: Any, revision: int) -> None:
        """Re-validate the ACL tables of an untrusted snapshot through the command checks."""
        if not isinstance(obj, dict) or set(obj) != _ACL_SNAPSHOT_KEYS:
            raise BadRequest("malformed acl section")
        if type(obj["bootstrapped"]) is not bool:
            raise BadRequest("acl.bootstrapped must be a bool")
        self._acl_bootstrapped = obj["bootstrapped"]
        self._intention_default = acl.check_action("intention_default", _arg_str("intention_default",
                                                                               obj["intention_default"]))
        for key in ("tokens", "roles", "users", "intentions"):
            if not isinstance(obj[key], list):
                raise BadRequest(f"acl.{key} must be a list")
        for raw in obj["roles"]:
            if not isinstance(raw, dict) or set(raw) != {"name", "rules"} or not isinstance(raw["rules"], list):
                raise BadRequest("malformed role record")
            texts = [acl.format_rule(r) if isinstance(r, dict) else "" for r in raw["rules"]]
            cmd = validate_command({"op": "acl_role_put", "name": raw["name"], "rules": texts})
            if cmd["name"] in self._acl_roles or cmd["name"] == acl.MANAGEMENT_ROLE:
                raise BadRequest(f"duplicate role {cmd['name']!r}")
            self._acl_roles[cmd["name"]] = {"name": cmd["name"], "rules": [acl.parse_rule(t) for t in cmd["rules"]]}
        token_keys = {"id", "secret_hash", "roles", "description", "expires_ms", "create_revision"}
        for raw in obj["tokens"]:
            # "login" only on login tokens (absent in snapshots from before it existed).
            if not isinstance(raw, dict) or not token_keys <= set(raw) <= token_keys | {"login"}:
                raise BadRequest("malformed token record")
            if raw.get("login") == "":
                raise BadRequest("malformed token record: empty login")
            cmd = validate_command({"op": "acl_token_create", "token_id": raw["id"], "secret_hash": raw["secret_hash"],
                                    "roles": raw["roles"], "description": raw["description"],
                                    "expires_ms": raw["expires_ms"], "login": raw.get("login", "")})
            created = raw["create_revision"]
            if type(created) is not int or not 0 < created <= revision:
                raise BadRequest("token create_revision out of range")
            if cmd["token_id"] in self._acl_tokens or cmd["secret_hash"] in self._acl_token_by_hash:
                raise BadRequest(f"duplicate token {cmd['token_id']!r}")
            rec = {"id": cmd["token_id"], "secret_hash": cmd["secret_hash"], "roles": cmd["roles"],
                   "description": cmd["description"], "expires_ms": cmd["expires_ms"], "create_revision": created}
            if cmd["login"]:
                rec["login"] = cmd["login"]
            self._acl_tokens[rec["id"]] = rec
            self._acl_token_by_hash[rec["secret_hash"]] = rec
        for raw in obj["users"]:
            if not isinstance(raw, dict) or set(raw) != {"name", "password_hash", "roles"}:
                raise BadRequest("malformed user record")
            cmd = validate_command({"op": "acl_user_put", **raw})
            if cmd["name"] in self._acl_users:
                raise BadRequest(f"duplicate user {cmd['name']!r}")
            self._acl_users[cmd["name"]] = {"name": cmd["name"], "password_hash": cmd["password_hash"],
                                            "roles": cmd["roles"]}
        for raw in obj["intentions"]:
            if not isinstance(raw, dict) or set(raw) != {"source", "destination", "action"}:
                raise BadRequest("malformed intention record")
            cmd = validate_command({"op": "intention_put", **raw})
            key = f"{cmd['source']}->{cmd['destination']}"
            if key in self._intentions:
                raise BadRequest(f"duplicate intention {key}")
            self._intentions[key] = {"source": cmd["source"], "destination": cmd["destination"],
                                     "action": cmd["action"]}

    @staticmethod
    def _parse_dedup_entry(entry: Any, revision: int) -> tuple[tuple[str, str], _Outcome]:
        """``[rid, outcome]`` or ``[rid, outcome, caller]`` (the caller's token hash, never empty)."""
        if not isinstance(entry, list) or len(entry) not in (2, 3) or not isinstance(entry[0], str):
            raise BadRequest("malformed dedup entry")
        rid = model.check_rid("rid", entry[0])
        assert rid is not None
        owner = ""
        if len(entry) == 3:
            owner = entry[2]
            if not isinstance(owner, str) or not owner:
                raise BadRequest(f"dedup entry {rid!r}: malformed caller")
            try:
                acl.check_hash("caller", owner)
            except RegistryError as err:
                raise BadRequest(f"dedup entry {rid!r}: {err.message}") from None
        key = (owner, rid)
        out = entry[1]
        if isinstance(out, dict) and set(out) == {"result"}:
            result = out["result"]
            if (
                not isinstance(result, dict)
                or type(result.get("revision")) is not int
                or not 0 <= result["revision"] <= revision
            ):
                raise BadRequest(f"dedup entry {rid!r}: malformed result")
            return key, _Outcome(result, None, "")
        if isinstance(out, dict) and set(out) == {"error", "message"}:
            err_cls = CODES.get(out["error"]) if isinstance(out["error"], str) else None
            if err_cls is None or not isinstance(out["message"], str):
                raise BadRequest(f"dedup entry {rid!r}: malformed error")
            return key, _Outcome(None, err_cls, out["message"])
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
        if self._bytes != self._count_bytes():
            fail(f"state bytes {self._bytes} differ from a recount {self._count_bytes()}")
        if not set(self._attached) <= set(self._leases):
            fail("attachment index names a lease that does not exist")
        if not self._lease_owners.keys() <= self._leases.keys():
            fail("a lease owner is recorded for a lease that does not exist")
        # Built only for leases that carry something: a bare lease costs no sets here either.
        expect: dict[int, _Attached] = {}

        def holder_of(what: str, rec: Record) -> _Attached | None:
            lease = rec["lease"]
            if lease is None:
                return None
            if lease not in self._leases:
                fail(f"{what} carries missing lease {lease}")
            att = expect.get(lease)
            if att is None:
                att = expect[lease] = _Attached()
            return att

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
        for lease in expect.keys() | self._attached.keys():
            att = self._attached.get(lease, _NOTHING_ATTACHED)
            want = expect.get(lease, _NOTHING_ATTACHED)
            if (att.instances, att.keys, att.locks) != (want.instances, want.keys, want.locks):
                fail(f"attachment index of lease {lease} is stale")
        if self._leases and max(self._leases) >= self._next_lease:
            fail(f"lease {max(self._leases)} not below next_lease")


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
    "identity_put": RegistryState._op_identity_put,
    "identity_delete": RegistryState._op_identity_delete,
    "key_put": RegistryState._op_key_put,
    "key_delete": RegistryState._op_key_delete,
    "lock_acquire": RegistryState._op_lock_acquire,
    "lock_release": RegistryState._op_lock_release,
    "barrier": RegistryState._op_barrier,
    "acl_bootstrap": RegistryState._op_acl_bootstrap,
    "acl_token_create": RegistryState._op_acl_token_create,
    "acl_token_delete": RegistryState._op_acl_token_delete,
    "acl_role_put": RegistryState._op_acl_role_put,
    "acl_role_delete": RegistryState._op_acl_role_delete,
    "acl_user_put": RegistryState._op_acl_user_put,
    "acl_user_delete": RegistryState._op_acl_user_delete,
    "intention_put": RegistryState._op_intention_put,
    "intention_delete": RegistryState._op_intention_delete,
    "intention_default_set": RegistryState._op_intention_default_set,
}
assert set(_HANDLERS) == OPS, "every schema'd op needs a handler and vice versa"
