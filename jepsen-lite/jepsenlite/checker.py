"""Checkers: pure functions from a history to a verdict.

Each checker takes paired operations (:func:`jepsenlite.history.pair`) and
returns a :class:`CheckResult` whose ``valid`` is ``True``, ``False`` (a
definite violation, with examples) or ``"unknown"`` (the check could not
finish: search budget exhausted, final read missing).  Nothing here does I/O
or reads a clock except the linearizability search's wall-clock budget.

Soundness rule: a checker flags only what no correct cluster could have
produced, given that an ``info`` operation may have taken effect at any time
after its invocation, or never.

Linearizability (register workload)
-----------------------------------
Per key (linearizability is compositional, so keys are checked apart), a
Wing & Gong search with Lowe's memoisation: the history becomes a list of
call and return entries in time order; the search repeatedly picks a call
entry that is still pending before the first return entry, applies it to
the model, and backtracks when a return entry is reached whose operation
was not linearized.  Configurations already explored, (set of linearized
operations, model state), are cached, which is what makes this practical.
An ``info`` operation's return entry sits at the end of time, so it may be
linearized anywhere after its call, or never (the search succeeds once only
``info`` returns are left).

The model is our state machine.  The state of one key is its value (or
absent); a step builds a ``RegistryState`` holding that value and applies
the operation's command to it (``key_put``, ``key_put`` with
``if_mod_revision``).  Revisions in the history come from the real cluster,
so a CAS's ``if_mod_revision`` is translated: the workload writes every
value once only and remembers which value it saw at that revision, so "the
key's mod_revision is R" is the same predicate as "the key's value is the
value written at R" -- and the model compares on that.  A CAS answered
``CONFLICT`` is kept as an observation (its guard did not hold at its
linearization point); reads that did not return ``ok`` constrain nothing
and are dropped, as are writes that definitely failed.
"""

from __future__ import annotations

import time
from bisect import bisect_left, bisect_right
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from registry.errors import Conflict
from registry.fsm.state import RegistryState

from .history import Op

__all__ = [
    "CheckResult",
    "Valid",
    "RegisterOp",
    "RegistryKeyModel",
    "LinearizabilityResult",
    "check_linearizable",
    "register_ops",
    "check_register",
    "check_set",
    "check_lease",
    "check_lock",
    "check_revisions",
    "check_watch",
    "watch_segment",
    "WatchSegment",
    "merge_valid",
    "check_history",
    "check_convergence",
]

Valid = bool | Literal["unknown"]

#: Examples kept per violation kind, so a broken run still gives a readable report.
EXAMPLES_MAX = 10


@dataclass
class CheckResult:
    name: str
    valid: Valid
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"valid": self.valid, **self.details}


def merge_valid(values: Sequence[Valid]) -> Valid:
    """False if any is False, else "unknown" if any is unknown, else True (also for none)."""
    if any(v is False for v in values):
        return False
    if any(v == "unknown" for v in values):
        return "unknown"
    return True


def _brief(op: Op) -> dict[str, Any]:
    out: dict[str, Any] = {"index": op.index, "process": op.process, "f": op.f, "key": op.key, "value": op.value,
                           "type": op.type, "invoke_time": op.invoke_time, "complete_time": op.complete_time}
    if op.result is not None:
        out["result"] = op.result
    if op.error is not None:
        out["error"] = op.error
    if op.revision is not None:
        out["revision"] = op.revision
    return out


# ---------------------------------------------------------------------------------------------- linearizability


@dataclass(frozen=True, slots=True)
class RegisterOp:
    """A register operation as the search sees it."""

    #: "read" (observed ``value``), "write" (sets ``value``), "cas" (sets ``value`` if the
    #: current value is ``expected``), "cas-fail" (observed that it is not ``expected``).
    kind: str
    value: str | None
    expected: str | None
    call: int
    #: None: the outcome is unknown; it may take effect any time after ``call``, or never.
    ret: int | None
    #: History index, for reports.
    index: int = -1


class RegistryKeyModel:
    """One key's transitions, computed by the real state machine.

    ``step(state, op) -> (legal, next_state)``; a state is the key's value or
    None (absent).  Steps are pure, so they are cached: the search asks the
    same question many times.
    """

    _KEY = "jepsen-model-key"

    def __init__(self) -> None:
        self._cache: dict[tuple[str | None, str, str | None, str | None], tuple[bool, str | None]] = {}

    def step(self, state: str | None, op: RegisterOp) -> tuple[bool, str | None]:
        cache_key = (state, op.kind, op.value, op.expected)
        hit = self._cache.get(cache_key)
        if hit is None:
            hit = self._cache[cache_key] = self._step(state, op)
        return hit

    def _step(self, state: str | None, op: RegisterOp) -> tuple[bool, str | None]:
        if op.kind == "read":
            return op.value == state, state
        sm = RegistryState()
        mod_revision = 0
        if state is not None:
            mod_revision = int(sm.apply({"op": "key_put", "key": self._KEY, "value": state}).result["revision"])
        command: dict[str, Any] = {"op": "key_put", "key": self._KEY, "value": op.value or ""}
        if op.kind in ("cas", "cas-fail"):
            # The value->revision translation described in the module docstring: a guard that
            # names the current value is the current mod_revision, anything else cannot match.
            if op.expected is None:
                command["if_mod_revision"] = 0
            else:
                command["if_mod_revision"] = mod_revision if op.expected == state else mod_revision + 1
        elif op.kind != "write":
            raise ValueError(f"unknown register op kind {op.kind!r}")
        try:
            sm.apply(command)
        except Conflict:
            applied = False
        else:
            applied = True
        after = sm.get_key(self._KEY)["value"] if applied else state
        if op.kind == "cas-fail":
            return not applied, state
        return applied, after


@dataclass
class LinearizabilityResult:
    valid: Valid
    steps: int
    #: Most operations linearized on any branch of the search.
    linearized_max: int
    #: Op (position in the input) whose return no branch could get past, when invalid.
    stuck_at: int | None = None
    reason: str = ""


def check_linearizable(ops: Sequence[RegisterOp], model: RegistryKeyModel | None = None, *,
                       initial: str | None = None, max_steps: int = 2_000_000,
                       deadline_s: float = 20.0) -> LinearizabilityResult:
    """WGL search with memoisation (see the module docstring).  Bounded: past ``max_steps``
    steps or ``deadline_s`` seconds the answer is "unknown", never a hang."""
    model = model or RegistryKeyModel()
    n = len(ops)
    if n == 0:
        return LinearizabilityResult(True, 0, 0)
    # Entries 1..2n in time order; at equal times calls go first (the ops then overlap,
    # which only allows more orders: the sound choice).
    entries: list[tuple[float, int, int]] = []
    for i, op in enumerate(ops):
        entries.append((op.call, 0, i))
        entries.append((op.ret if op.ret is not None else float("inf"), 1, i))
    entries.sort()
    size = len(entries)
    nxt = [-1] * (size + 1)
    prv = [0] * (size + 1)
    is_call = [False] * (size + 1)
    op_of = [0] * (size + 1)
    ret_entry = [0] * n
    for pos, (_, kind, i) in enumerate(entries, start=1):
        is_call[pos] = kind == 0
        op_of[pos] = i
        if kind == 1:
            ret_entry[i] = pos
    for pos in range(size + 1):
        nxt[pos] = pos + 1 if pos < size else -1
        prv[pos] = pos - 1
    unknown_return = [op.ret is None for op in ops]

    def unlink(pos: int) -> None:
        nxt[prv[pos]] = nxt[pos]
        if nxt[pos] != -1:
            prv[nxt[pos]] = prv[pos]

    def relink(pos: int) -> None:
        nxt[prv[pos]] = pos
        if nxt[pos] != -1:
            prv[nxt[pos]] = pos

    state = initial
    linearized = 0
    count = 0
    best = 0
    stuck: int | None = None
    seen: set[tuple[int, str | None]] = set()
    stack: list[tuple[int, str | None]] = []
    entry = nxt[0]
    steps = 0
    give_up = time.monotonic() + deadline_s
    while nxt[0] != -1:
        steps += 1
        if steps > max_steps or (steps & 0x3FFF == 0 and time.monotonic() > give_up):
            return LinearizabilityResult("unknown", steps, best, None,
                                         f"search budget exhausted after {steps} steps")
        if is_call[entry]:
            i = op_of[entry]
            legal, after = model.step(state, ops[i])
            if legal:
                bits = linearized | (1 << i)
                if (bits, after) not in seen:
                    seen.add((bits, after))
                    stack.append((entry, state))
                    state = after
                    linearized = bits
                    count += 1
                    unlink(entry)
                    unlink(ret_entry[i])
                    entry = nxt[0]
                    continue
            entry = nxt[entry]
            continue
        i = op_of[entry]
        if unknown_return[i]:
            # Only returns "at the end of time" are left: every completed op is linearized.
            return LinearizabilityResult(True, steps, max(best, count))
        if count >= best:
            best, stuck = count, i
        if not stack:
            return LinearizabilityResult(False, steps, best, stuck, "no linearization exists")
        entry, state = stack.pop()
        i = op_of[entry]
        linearized &= ~(1 << i)
        count -= 1
        relink(ret_entry[i])
        relink(entry)
        entry = nxt[entry]
    return LinearizabilityResult(True, steps, max(best, count))


def register_ops(ops: Sequence[Op], workload: str = "register") -> dict[str, list[tuple[RegisterOp, Op]]]:
    """Turn the register workload's operations into search input, per key (see the docstring)."""
    out: dict[str, list[tuple[RegisterOp, Op]]] = defaultdict(list)
    for op in ops:
        if op.workload != workload:
            continue
        ret = op.complete_time if op.type != "info" else None
        if op.f == "read":
            if op.type == "ok":
                out[op.key].append((RegisterOp("read", op.result, None, op.invoke_time, ret, op.index), op))
        elif op.f == "write":
            if op.type != "fail":
                out[op.key].append((RegisterOp("write", op.value, None, op.invoke_time, ret, op.index), op))
        elif op.f == "cas":
            expected, new = op.value["from"], op.value["to"]
            if op.type == "fail" and op.error == "CONFLICT":
                out[op.key].append((RegisterOp("cas-fail", None, expected, op.invoke_time, ret, op.index), op))
            elif op.type != "fail":
                out[op.key].append((RegisterOp("cas", new, expected, op.invoke_time, ret, op.index), op))
        else:
            raise ValueError(f"unknown register op {op.f!r} at {op.index}")
    return dict(out)


def check_register(ops: Sequence[Op], *, max_steps: int = 2_000_000, deadline_s: float = 20.0) -> CheckResult:
    per_key = register_ops(ops)
    keys: dict[str, Any] = {}
    verdicts: list[Valid] = []
    for key in sorted(per_key):
        pairs = per_key[key]
        reg_ops = [p[0] for p in pairs]
        res = check_linearizable(reg_ops, RegistryKeyModel(), max_steps=max_steps, deadline_s=deadline_s)
        info: dict[str, Any] = {"valid": res.valid, "ops": len(reg_ops),
                                "unknown_outcome": sum(1 for r in reg_ops if r.ret is None),
                                "steps": res.steps}
        if res.valid is not True:
            info["reason"] = res.reason
            info["linearized_max"] = res.linearized_max
        if res.valid is False and res.stuck_at is not None:
            stuck = pairs[res.stuck_at][1]
            end = stuck.complete_time if stuck.complete_time is not None else float("inf")
            concurrent = [p[1] for p in pairs
                          if p[1].invoke_time <= end
                          and (p[1].complete_time is None or p[1].complete_time >= stuck.invoke_time)
                          and p[1] is not stuck]
            # The op no order could place, and the last ops that completed before it was invoked.
            before = sorted((p[1] for p in pairs if p[1].complete_time is not None
                             and p[1].complete_time < stuck.invoke_time and p[1].type != "info"),
                            key=lambda o: o.complete_time or 0)[-5:]
            info["stuck_op"] = _brief(stuck)
            info["concurrent_ops"] = [_brief(o) for o in concurrent[:EXAMPLES_MAX * 2]]
            info["preceding_ops"] = [_brief(o) for o in before]
        keys[key] = info
        verdicts.append(res.valid)
    return CheckResult("linearizable-register", merge_valid(verdicts), {"keys": keys})


# ---------------------------------------------------------------------------------------------- set


def check_set(ops: Sequence[Op], workload: str = "set") -> CheckResult:
    """No acknowledged add lost, nothing appears that was never added, reads are not stale.

    Elements are unique: added once, removed at most once (after an acknowledged add).  The
    final read is the last ``ok`` read invoked after every add and remove had completed.
    """
    adds: dict[str, Op] = {}
    removes: dict[str, Op] = {}
    reads: list[Op] = []
    for op in ops:
        if op.workload != workload:
            continue
        if op.f == "add":
            adds[op.value] = op
        elif op.f == "remove":
            removes[op.value] = op
        elif op.f == "read" and op.type == "ok":
            reads.append(op)
    last_update = max((op.complete_time if op.complete_time is not None else op.invoke_time
                       for op in (*adds.values(), *removes.values())), default=0)
    finals = [r for r in reads if r.invoke_time > last_update]
    final_indexes = {r.index for r in finals}
    violations: dict[str, list[Any]] = defaultdict(list)

    def flag(kind: str, example: Any) -> None:
        violations[kind].append(example)

    # A definite NOT_FOUND on removing an element whose add was acknowledged: it was lost.
    for element, rem in removes.items():
        add = adds.get(element)
        if (rem.type == "fail" and rem.error == "NOT_FOUND" and add is not None and add.type == "ok"
                and add.complete_time is not None and add.complete_time < rem.invoke_time):
            flag("lost", {"element": element, "how": "remove answered NOT_FOUND", "add": _brief(add),
                          "remove": _brief(rem)})
    # Every linearizable read, intermediate or final.
    for read in reads:
        present = set(read.result or [])
        assert read.complete_time is not None
        for element in present:
            added = adds.get(element)
            if added is None or added.invoke_time > read.complete_time:
                flag("unexpected", {"element": element, "read": read.index})
            elif added.type == "fail":
                flag("unexpected", {"element": element, "read": read.index, "add": _brief(added)})
            removed = removes.get(element)
            if removed is not None and removed.type == "ok" and removed.complete_time is not None \
                    and removed.complete_time < read.invoke_time:
                flag("resurrected", {"element": element, "read": read.index, "remove": _brief(removed)})
        for element, add in adds.items():
            if add.type != "ok" or add.complete_time is None or add.complete_time >= read.invoke_time:
                continue
            if element in present:
                continue
            later = removes.get(element)
            if later is not None and later.invoke_time <= read.complete_time:
                continue
            flag("lost" if read.index in final_indexes else "stale-read",
                 {"element": element, "read": _brief(read) | {"result": None}, "add": _brief(add)})
    counts = {
        "adds_ok": sum(1 for a in adds.values() if a.type == "ok"),
        "adds_unknown": sum(1 for a in adds.values() if a.type == "info"),
        "adds_failed": sum(1 for a in adds.values() if a.type == "fail"),
        "removes_ok": sum(1 for r in removes.values() if r.type == "ok"),
        "reads_ok": len(reads),
    }
    details: dict[str, Any] = {"counts": counts}
    if finals:
        final = max(finals, key=lambda r: r.index)
        final_set = set(final.result or [])
        details["final_size"] = len(final_set)
        details["unknown_adds_present"] = sum(1 for e, a in adds.items() if a.type == "info" and e in final_set)
    for kind, examples in violations.items():
        details[kind] = {"count": len(examples), "examples": examples[:EXAMPLES_MAX]}
    if violations:
        return CheckResult("set", False, details)
    if not finals:
        details["reason"] = "no successful final read"
        return CheckResult("set", "unknown", details)
    return CheckResult("set", True, details)


# ---------------------------------------------------------------------------------------------- leases


def check_lease(ops: Sequence[Op], *, workload: str = "lease", clock_rate_max: float = 1.0,
                tolerance_ms: float = 50.0) -> CheckResult:
    """A lease kept alive does not expire.

    The countdown of a lease restarts no earlier than the invocation of an acknowledged grant or
    keepalive, so a keepalive answered NOT_FOUND (or a linearizable ``probe`` read that found no
    such lease) that completed before ``last_ok.invoke + TTL`` (TTL divided by the fastest clock
    rate a node ran at, less a small tolerance for timestamps) means the lease expired early.
    The expiry tick and the stall guard only ever make expiry later, never earlier.  A lease
    answered NOT_FOUND and later acknowledged alive is a violation too.  Leases the client
    revoked are exempt from both from the revoke's invocation.
    """
    per_lease: dict[int, list[Op]] = defaultdict(list)
    ttl_of: dict[int, int] = {}
    for op in ops:
        if op.workload != workload:
            continue
        if op.f == "grant":
            if op.type == "ok":
                lease = int(op.result["lease"])
                ttl_of[lease] = int(op.result["ttl_ms"])
                per_lease[lease].append(op)
        elif op.f in ("keepalive", "revoke", "probe"):
            per_lease[int(op.key)].append(op)
    early: list[Any] = []
    back: list[Any] = []
    counts = {"leases": len(ttl_of), "keepalives_ok": 0, "not_found": 0, "lapsed_as_expected": 0}
    for lease, lops in per_lease.items():
        if lease not in ttl_of:
            continue
        allowed_ns = (ttl_of[lease] / max(clock_rate_max, 1.0) - tolerance_ms) * 1e6
        lops.sort(key=lambda o: o.invoke_time)
        revoked_at = min((o.invoke_time for o in lops if o.f == "revoke"), default=None)
        last_ok: Op | None = None
        gone: Op | None = None
        for op in lops:
            if revoked_at is not None and op.invoke_time >= revoked_at:
                break
            seen_gone = (op.f == "keepalive" and op.type == "fail" and op.error == "NOT_FOUND") or (
                op.f == "probe" and op.type == "ok" and op.result is None)
            if op.type == "ok" and not seen_gone:
                if op.f == "keepalive":
                    counts["keepalives_ok"] += 1
                if gone is not None:
                    back.append({"lease": lease, "not_found": _brief(gone), "then_ok": _brief(op)})
                if op.f in ("grant", "keepalive"):
                    last_ok = op
            elif seen_gone:
                counts["not_found"] += 1
                gone = gone or op
                if last_ok is None or op.complete_time is None:
                    continue
                if op.complete_time < last_ok.invoke_time + allowed_ns:
                    early.append({"lease": lease, "ttl_ms": ttl_of[lease],
                                  "ms_after_last_renewal": round((op.complete_time - last_ok.invoke_time) / 1e6, 1),
                                  "last_ok": _brief(last_ok), "not_found": _brief(op)})
                else:
                    counts["lapsed_as_expected"] += 1
    details: dict[str, Any] = {"counts": counts, "clock_rate_max": clock_rate_max, "tolerance_ms": tolerance_ms}
    if early:
        details["expired_early"] = {"count": len(early), "examples": early[:EXAMPLES_MAX]}
    if back:
        details["alive_after_not_found"] = {"count": len(back), "examples": back[:EXAMPLES_MAX]}
    return CheckResult("lease", not (early or back), details)


# ---------------------------------------------------------------------------------------------- locks


def check_lock(ops: Sequence[Op], workload: str = "lock") -> CheckResult:
    """Fencing tokens grow and no two holders overlap -- flagging only definite overlaps.

    * Tokens are unique per lock, and an acquisition that completed before another was
      invoked has the smaller token.
    * Revisions order everything: if A acquired at token tA and its release was
      acknowledged at revision rA, no other acquisition can have a token in (tA, rA).
    * If B's acquisition was acknowledged while A had not yet invoked its release, and A's
      lease was acknowledged alive by a keepalive invoked after that, both held the lock.
    """
    acquires: dict[str, list[Op]] = defaultdict(list)
    releases: dict[tuple[str, int], Op] = {}
    keepalive_ok: dict[int, list[int]] = defaultdict(list)
    for op in ops:
        if op.workload != workload:
            continue
        if op.f == "acquire" and op.type == "ok" and op.result.get("acquired", True):
            acquires[op.key].append(op)
        elif op.f == "release":
            releases[(op.key, int(op.value["lease"]))] = op
        elif op.f == "keepalive" and op.type == "ok":
            keepalive_ok[int(op.value["lease"])].append(op.invoke_time)
    found: dict[str, list[Any]] = defaultdict(list)
    for name, acqs in acquires.items():
        by_token: dict[int, Op] = {}
        for a in acqs:
            token = int(a.result["token"])
            if token in by_token:
                found["duplicate-token"].append({"lock": name, "a": _brief(by_token[token]), "b": _brief(a)})
            by_token[token] = a
        # Real-time order: sweep acquisitions by invoke time over those already completed.
        done = sorted(acqs, key=lambda o: o.complete_time or 0)
        best: Op | None = None
        j = 0
        for b in sorted(acqs, key=lambda o: o.invoke_time):
            while j < len(done) and (done[j].complete_time or 0) < b.invoke_time:
                if best is None or done[j].result["token"] > best.result["token"]:
                    best = done[j]
                j += 1
            if best is not None and best is not b and b.result["token"] <= best.result["token"]:
                found["token-order"].append({"lock": name, "earlier": _brief(best), "later": _brief(b)})
        for a in acqs:
            t_a = int(a.result["token"])
            lease_a = int(a.value["lease"])
            rel = releases.get((name, lease_a))
            if rel is not None and rel.type == "ok" and rel.result is not None:
                r_a = int(rel.result["revision"])
                for b in acqs:
                    if b is not a and t_a < int(b.result["token"]) < r_a:
                        found["overlap"].append({"lock": name, "holder": _brief(a), "release": _brief(rel),
                                                 "second_holder": _brief(b)})
            for b in acqs:
                if b is a or int(b.result["token"]) <= t_a or b.complete_time is None:
                    continue
                granted = b.complete_time
                if rel is not None and rel.invoke_time < granted:
                    continue
                alive = [t for t in keepalive_ok.get(lease_a, []) if t > granted]
                if alive:
                    found["overlap"].append({"lock": name, "holder": _brief(a), "second_holder": _brief(b),
                                             "holder_lease_kept_alive_at": min(alive)})
    details: dict[str, Any] = {"acquisitions": sum(len(v) for v in acquires.values())}
    for kind, examples in found.items():
        details[kind] = {"count": len(examples), "examples": examples[:EXAMPLES_MAX]}
    return CheckResult("lock", not found, details)


# ---------------------------------------------------------------------------------------------- revisions

#: Operations that create a new revision when they succeed (strictly above anything before them).
MUTATING = frozenset(("write", "cas", "add", "remove", "grant", "revoke", "acquire", "release", "put",
                      "delete"))
#: Operations whose revision is not linearizable: keepalives are answered from the leader's memory.
UNORDERED = frozenset(("keepalive",))


def check_revisions(ops: Sequence[Op]) -> CheckResult:
    """Revisions never go backwards in real time, across all workloads.

    If op A completed before op B was invoked, B's revision is at least A's, and strictly
    above it when B changed state (B was applied after A's effects were visible).
    """
    dated = [op for op in ops if op.type == "ok" and op.revision is not None and op.f not in UNORDERED
             and op.complete_time is not None]
    by_complete = sorted(dated, key=lambda o: o.complete_time or 0)
    best: Op | None = None
    j = 0
    bad: list[Any] = []
    for b in sorted(dated, key=lambda o: o.invoke_time):
        while j < len(by_complete) and (by_complete[j].complete_time or 0) < b.invoke_time:
            cand = by_complete[j]
            if best is None or (cand.revision or 0) > (best.revision or 0):
                best = cand
            j += 1
        if best is None or b.revision is None or best.revision is None:
            continue
        mutating = b.f in MUTATING and not (isinstance(b.result, dict) and b.result.get("acquired") is False)
        if b.revision < best.revision or (mutating and b.revision == best.revision):
            bad.append({"earlier": _brief(best), "later": _brief(b)})
    details: dict[str, Any] = {"ops": len(dated)}
    if bad:
        details["went_backwards"] = {"count": len(bad), "examples": bad[:EXAMPLES_MAX]}
    return CheckResult("revisions", not bad, details)


# ---------------------------------------------------------------------------------------------- watches

#: One observed change of the watched selection: (type "put"/"delete", key, value or None).
WatchChange = tuple[str, str, Any]


@dataclass
class WatchSegment:
    """One watch stream as the checker sees it: what it delivered, and what it vouched for.

    ``intervals`` are the revision ranges [a, b] over which the stream delivered *every* change
    of the selection: from its start to the last revision it covered (event or progress),
    broken where a snapshot (resync) replaced events.
    """

    op: Op
    events: dict[int, list[WatchChange]]
    times: dict[int, int]
    intervals: list[tuple[int, int]]
    snapshots: list[tuple[int, dict[str, tuple[Any, int]]]]


def watch_segment(op: Op, flag: Any) -> WatchSegment:
    """Parse a ``watch`` op's delivered items, flagging order violations within the stream.

    ``op.value["start_revision"]`` is where the stream was asked to start (None: after the
    ``created`` revision); ``op.result["items"]`` is the delivered sequence:
    ``["event", revision, type, key, value, t_ns]``, ``["progress", revision, t_ns]`` (nothing
    up to revision), ``["snapshot", revision, {key: [value, mod_revision]}, t_ns]``.
    """
    result = op.result or {}
    start = (op.value or {}).get("start_revision")
    if start is None:
        start = int(result.get("created") or 0) + 1
    start = int(start)
    events: dict[int, list[WatchChange]] = {}
    times: dict[int, int] = {}
    intervals: list[tuple[int, int]] = []
    snapshots: list[tuple[int, dict[str, tuple[Any, int]]]] = []
    first, last = start, start - 1
    last_event = 0
    for item in result.get("items", []):
        kind, revision = item[0], int(item[1])
        if kind == "event":
            change: WatchChange = (str(item[2]), str(item[3]), item[4])
            if revision in events and revision == last_event and change not in events[revision]:
                events[revision].append(change)  # several changes in one revision
                continue
            if revision <= last or revision < start:
                flag("out-of-order" if revision not in events else "duplicate",
                     {"stream": op.index, "revision": revision, "after": last, "change": list(change)})
                continue
            events[revision] = [change]
            times[revision] = int(item[5])
            last = last_event = revision
        elif kind == "progress":
            last = max(last, revision)
        elif kind == "snapshot":
            if revision < last:
                flag("snapshot-backwards", {"stream": op.index, "revision": revision, "after": last})
                continue
            if last >= first:
                intervals.append((first, last))
            snapshots.append((revision, {k: (v[0], int(v[1])) for k, v in item[2].items()}))
            first, last = revision + 1, revision
        else:
            raise ValueError(f"unknown watch item {kind!r} in op {op.index}")
    if last >= first:
        intervals.append((first, last))
    return WatchSegment(op, events, times, intervals, snapshots)


def _merge_intervals(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _covered(merged: list[tuple[int, int]], a: int, b: int) -> bool:
    """Whether [a, b] lies inside the union ``merged`` (empty ranges are covered)."""
    if a > b:
        return True
    return any(x <= a and b <= y for x, y in merged)


def check_watch(ops: Sequence[Op], workload: str = "watch") -> CheckResult:
    """Watch streams deliver every committed change of their selection, in order, exactly once.

    The workload's writers ``put`` unique values (and ``delete``) keys under one prefix; watch
    streams (``watch`` ops, on different nodes, one after another) record what they got; a
    linearizable ``final-read`` lists the prefix after healing.  The selection is empty at
    revision 0 (a fresh cluster).  Violations:

    * ``out-of-order`` / ``duplicate``: a stream's revisions do not strictly increase;
    * ``disagree``: two streams delivered different changes at one revision;
    * ``gap``: a change another stream delivered, or an acknowledged write, is missing from a
      stream that vouched for that revision (it delivered events or progress past it);
    * ``wrong-revision``: an acknowledged write shows up at another revision than it was
      acknowledged with, or not with its value;
    * ``phantom``: a value nobody wrote, or that was written by a write that definitely failed,
      or delivered before the write was invoked; a delete where no delete of that key could be;
    * ``snapshot-mismatch`` / ``final-read-mismatch``: a resync snapshot, or the final read,
      differs from the state the delivered changes add up to at that revision.
    """
    puts: dict[Any, Op] = {}
    deletes: dict[str, list[Op]] = defaultdict(list)
    acked: dict[int, list[tuple[WatchChange, Op]]] = defaultdict(list)
    segments_ops: list[Op] = []
    finals: list[Op] = []
    for op in ops:
        if op.workload != workload:
            continue
        if op.f == "put":
            puts[op.value] = op
            if op.type == "ok" and op.revision is not None:
                acked[op.revision].append((("put", str(op.key), op.value), op))
        elif op.f == "delete":
            deletes[str(op.key)].append(op)
            if op.type == "ok" and op.revision is not None:
                acked[op.revision].append((("delete", str(op.key), None), op))
        elif op.f == "watch" and op.type == "ok":
            segments_ops.append(op)
        elif op.f == "final-read" and op.type == "ok":
            finals.append(op)
    found: dict[str, list[Any]] = defaultdict(list)

    def flag(kind: str, example: Any) -> None:
        found[kind].append(example)

    segments = [watch_segment(op, flag) for op in segments_ops]
    # The changes at each revision, as the first stream that delivered it saw them.
    truth: dict[int, list[WatchChange]] = {}
    truth_from: dict[int, int] = {}
    for seg in segments:
        for revision, changes in seg.events.items():
            if revision not in truth:
                truth[revision], truth_from[revision] = changes, seg.op.index
            elif sorted(map(repr, truth[revision])) != sorted(map(repr, changes)):
                flag("disagree", {"revision": revision, "stream": truth_from[revision],
                                  "changes": [list(c) for c in truth[revision]], "other_stream": seg.op.index,
                                  "other_changes": [list(c) for c in changes]})
    revisions = sorted(truth)
    # Changes must come from writes that may have happened, no sooner than they were invoked.
    for revision in revisions:
        for type_, key, value in truth[revision]:
            delivered = min(seg.times[revision] for seg in segments if revision in seg.times)
            if type_ == "put":
                put = puts.get(value)
                if put is None or put.type == "fail" or put.key != key:
                    flag("phantom", {"revision": revision, "key": key, "value": value,
                                     "write": None if put is None else _brief(put)})
                elif put.invoke_time > delivered:
                    flag("phantom", {"revision": revision, "key": key, "value": value, "why": "delivered before "
                                     "the write was invoked", "write": _brief(put)})
                elif put.type == "ok" and put.revision is not None and put.revision != revision:
                    flag("wrong-revision", {"revision": revision, "write": _brief(put)})
            elif type_ == "delete":
                if not any(d.type != "fail" and d.invoke_time <= delivered for d in deletes.get(key, [])):
                    flag("phantom", {"revision": revision, "key": key, "why": "no delete of this key could "
                                     "have happened"})
    # Every stream delivered every change (known from other streams and from acks) in its ranges.
    acked_revisions = sorted(acked)
    uncovered_acks = 0
    coverage = _merge_intervals([iv for seg in segments for iv in seg.intervals])
    for revision in acked_revisions:
        if not _covered(coverage, revision, revision):
            uncovered_acks += 1
    for seg in segments:
        for a, b in seg.intervals:
            for revision in revisions[bisect_left(revisions, a):bisect_right(revisions, b)]:
                if revision not in seg.events:
                    flag("gap", {"stream": seg.op.index, "node": (seg.op.value or {}).get("node"),
                                 "revision": revision, "missing": [list(c) for c in truth[revision]],
                                 "seen_by_stream": truth_from[revision]})
            for revision in acked_revisions[bisect_left(acked_revisions, a):bisect_right(acked_revisions, b)]:
                got = seg.events.get(revision)
                for change, write in acked[revision]:
                    if got is None:
                        flag("gap", {"stream": seg.op.index, "node": (seg.op.value or {}).get("node"),
                                     "revision": revision, "missing_acknowledged": _brief(write)})
                    elif change not in got:
                        flag("wrong-revision", {"stream": seg.op.index, "revision": revision,
                                                "delivered": [list(c) for c in got], "write": _brief(write)})

    bases = sorted(((rev, snap) for seg in segments for rev, snap in seg.snapshots), key=lambda t: t[0])

    def state_at(revision: int, skip: int | None = None) -> dict[str, tuple[Any, int]] | None:
        """The selection at ``revision`` from the delivered changes, or None if they do not cover it."""
        base: dict[str, tuple[Any, int]] = {}
        base_rev = 0
        for snap_rev, snap in bases:
            if snap_rev <= revision and snap_rev != skip and _covered(coverage, snap_rev + 1, revision):
                base, base_rev = snap, snap_rev
        if base_rev == 0 and not _covered(coverage, 1, revision):
            return None
        state = dict(base)
        for rev in revisions[bisect_right(revisions, base_rev):bisect_right(revisions, revision)]:
            for type_, key, value in truth[rev]:
                if type_ == "put":
                    state[key] = (value, rev)
                else:
                    state.pop(key, None)
        return state

    unchecked: list[str] = []
    for seg in segments:
        for snap_rev, snap in seg.snapshots:
            expected = state_at(snap_rev, skip=snap_rev)
            if expected is None:
                unchecked.append(f"snapshot at {snap_rev} (changes before it not covered)")
            elif expected != snap:
                flag("snapshot-mismatch", {"stream": seg.op.index, "revision": snap_rev,
                                           "differs": _diff_states(expected, snap)})
    final_checked = False
    for final in finals:
        if final.revision is None:
            continue
        listed = {k: (v[0], int(v[1])) for k, v in (final.result or {}).items()}
        expected = state_at(final.revision)
        if expected is None:
            unchecked.append(f"final read at {final.revision} (streams do not cover every revision up to it)")
            continue
        final_checked = True
        if expected != listed:
            flag("final-read-mismatch", {"revision": final.revision, "final_read": _brief(final),
                                         "differs": _diff_states(expected, listed)})
    details: dict[str, Any] = {"counts": {
        "streams": len(segments),
        "revisions_delivered": len(revisions),
        "events_delivered": sum(len(seg.events) for seg in segments),
        "resyncs": sum(len(seg.snapshots) for seg in segments),
        "writes_ok": sum(len(v) for v in acked.values()),
        "writes_ok_not_covered": uncovered_acks,
        "covered": [list(iv) for iv in coverage],
    }}
    for kind, examples in found.items():
        details[kind] = {"count": len(examples), "examples": examples[:EXAMPLES_MAX]}
    if unchecked:
        details["unchecked"] = unchecked[:EXAMPLES_MAX]
    if found:
        return CheckResult("watch", False, details)
    if not segments or not final_checked:
        details["reason"] = "no watch stream" if not segments else "the final read could not be checked"
        return CheckResult("watch", "unknown", details)
    return CheckResult("watch", True, details)


def _diff_states(expected: dict[str, tuple[Any, int]], got: dict[str, tuple[Any, int]]) -> list[Any]:
    return [{"key": k, "expected": list(expected[k]) if k in expected else None,
             "got": list(got[k]) if k in got else None}
            for k in sorted(set(expected) | set(got)) if expected.get(k) != got.get(k)][:EXAMPLES_MAX]


# ---------------------------------------------------------------------------------------------- all


def check_history(ops: Sequence[Op], workloads: Sequence[str], *, clock_rate_max: float = 1.0,
                  max_steps: int = 2_000_000, deadline_s: float = 20.0,
                  convergence: dict[str, Any] | None = None) -> dict[str, CheckResult]:
    """Every checker that applies to the workloads that ran, the revision order of all of them,
    and whether the nodes converged after healing."""
    results: dict[str, CheckResult] = {}
    if "register" in workloads:
        results["linearizable-register"] = check_register(ops, max_steps=max_steps, deadline_s=deadline_s)
    if "set" in workloads:
        results["set"] = check_set(ops)
    if "lease" in workloads:
        results["lease"] = check_lease(ops, clock_rate_max=clock_rate_max)
    if "lock" in workloads:
        results["lock"] = check_lock(ops)
    if "watch" in workloads:
        results["watch"] = check_watch(ops)
    results["revisions"] = check_revisions(ops)
    results["convergence"] = check_convergence(convergence)
    return results


# ---------------------------------------------------------------------------------------------- convergence


def check_convergence(snapshot: dict[str, Any] | None) -> CheckResult:
    """After healing, every node holds the same state at the same revision.

    ``snapshot`` is what the session read from each node with stale reads
    (``{"nodes": {id: {"revision": r, "state": {...}} | {"error": ...}}}``).
    Two nodes that answered at the same revision with different data have
    diverged: a definite violation.  Nodes that never settled on one revision,
    or did not answer, make the verdict unknown.
    """
    if not snapshot or not snapshot.get("nodes"):
        return CheckResult("convergence", "unknown", {"reason": "no per-node reads after healing"})
    nodes: dict[str, Any] = snapshot["nodes"]
    answered = {nid: v for nid, v in nodes.items() if "state" in v}
    details: dict[str, Any] = {"revisions": {nid: v.get("revision") for nid, v in nodes.items()}}
    by_revision: dict[int, list[str]] = defaultdict(list)
    for nid, v in answered.items():
        by_revision[int(v["revision"])].append(nid)
    diverged = []
    for revision, ids in by_revision.items():
        first = answered[ids[0]]["state"]
        for other in ids[1:]:
            state = answered[other]["state"]
            if state != first:
                parts = sorted(k for k in set(first) | set(state) if first.get(k) != state.get(k))
                diverged.append({"revision": revision, "nodes": [ids[0], other], "differs_in": parts})
    if diverged:
        details["diverged"] = {"count": len(diverged), "examples": diverged[:EXAMPLES_MAX]}
        return CheckResult("convergence", False, details)
    if len(answered) < len(nodes) or len(by_revision) > 1:
        details["reason"] = "not every node answered at one common revision"
        return CheckResult("convergence", "unknown", details)
    return CheckResult("convergence", True, details)
