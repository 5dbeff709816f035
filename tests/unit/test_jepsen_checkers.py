"""Table tests of jepsen-lite's checkers: small hand-written histories, pure and fast."""

from __future__ import annotations

import itertools
import random
import sys
from pathlib import Path
from typing import Any

import pytest

# The folder name has a dash, so it cannot be imported as a package: put it on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "jepsen-lite"))

from jepsenlite.checker import (
    CheckResult,
    RegisterOp,
    RegistryKeyModel,
    check_lease,
    check_linearizable,
    check_lock,
    check_register,
    check_revisions,
    check_set,
    check_watch,
    merge_valid,
)
from jepsenlite.history import Event, Op, Recorder, pair
from jepsenlite.nemesis import partition_groups, plan
from jepsenlite.report import lanes_svg, latency_summary, report_html, unavailability

MS = 1_000_000


def rop(kind: str, value: str | None, call: int, ret: int | None, expected: str | None = None) -> RegisterOp:
    return RegisterOp(kind, value, expected, call * MS, None if ret is None else ret * MS)


# ---------------------------------------------------------------------------------------------- register model


@pytest.mark.parametrize(
    ("state", "op", "expected"),
    [
        (None, rop("read", None, 0, 1), (True, None)),
        ("a", rop("read", None, 0, 1), (False, "a")),
        ("a", rop("read", "a", 0, 1), (True, "a")),
        (None, rop("write", "a", 0, 1), (True, "a")),
        ("a", rop("write", "b", 0, 1), (True, "b")),
        (None, rop("cas", "b", 0, 1, expected=None), (True, "b")),
        ("a", rop("cas", "b", 0, 1, expected=None), (False, "a")),
        ("a", rop("cas", "b", 0, 1, expected="a"), (True, "b")),
        ("x", rop("cas", "b", 0, 1, expected="a"), (False, "x")),
        (None, rop("cas", "b", 0, 1, expected="a"), (False, None)),
        ("x", rop("cas-fail", None, 0, 1, expected="a"), (True, "x")),
        ("a", rop("cas-fail", None, 0, 1, expected="a"), (False, "a")),
        (None, rop("cas-fail", None, 0, 1, expected=None), (False, None)),
    ],
)
def test_model_steps_follow_the_state_machine(state: str | None, op: RegisterOp,
                                              expected: tuple[bool, str | None]) -> None:
    assert RegistryKeyModel().step(state, op) == expected


# ---------------------------------------------------------------------------------------------- linearizability

LINEARIZABILITY_CASES: list[tuple[str, list[RegisterOp], Any]] = [
    ("empty", [], True),
    ("sequential write then read", [rop("write", "a", 0, 1), rop("read", "a", 2, 3)], True),
    ("stale read after completed write", [rop("write", "a", 0, 1), rop("write", "b", 2, 3),
                                          rop("read", "a", 4, 5)], False),
    ("read of a value never written", [rop("read", "z", 0, 1)], False),
    ("concurrent read may see old or new", [rop("write", "a", 0, 1), rop("write", "b", 2, 6),
                                            rop("read", "a", 3, 4), rop("read", "b", 4, 5)], True),
    ("reads must not go back to old value", [rop("write", "a", 0, 1), rop("write", "b", 2, 9),
                                             rop("read", "b", 3, 4), rop("read", "a", 5, 6)], False),
    ("info write may take effect late", [rop("write", "a", 0, 1), rop("write", "b", 2, None),
                                         rop("read", "a", 3, 4), rop("read", "b", 10, 11)], True),
    ("info write may never take effect", [rop("write", "a", 0, 1), rop("write", "b", 2, None),
                                          rop("read", "a", 10, 11)], True),
    ("info write cannot take effect before its invoke", [rop("read", "b", 0, 1), rop("write", "b", 2, None)], False),
    ("info write cannot flip back", [rop("write", "a", 0, 1), rop("write", "b", 2, None), rop("read", "b", 3, 4),
                                     rop("read", "a", 5, 6)], False),
    ("cas ok", [rop("write", "a", 0, 1), rop("cas", "b", 2, 3, expected="a"), rop("read", "b", 4, 5)], True),
    ("cas ok on wrong value", [rop("write", "a", 0, 1), rop("cas", "b", 2, 3, expected="x")], False),
    ("cas conflict while value matched", [rop("write", "a", 0, 1), rop("cas-fail", None, 2, 3, expected="a")],
     False),
    ("cas conflict explained by concurrent write", [rop("write", "a", 0, 1), rop("write", "c", 2, 5),
                                                    rop("cas-fail", None, 3, 4, expected="a")], True),
    ("two cas from the same value cannot both win", [rop("write", "a", 0, 1), rop("cas", "b", 2, 5, expected="a"),
                                                     rop("cas", "c", 2, 5, expected="a")], False),
    ("create-if-absent", [rop("cas", "a", 0, 1, expected=None), rop("read", "a", 2, 3)], True),
    ("lost acknowledged write", [rop("write", "a", 0, 1), rop("read", None, 2, 3)], False),
]


@pytest.mark.parametrize(("name", "ops", "valid"), LINEARIZABILITY_CASES, ids=[c[0] for c in LINEARIZABILITY_CASES])
def test_linearizability(name: str, ops: list[RegisterOp], valid: Any) -> None:
    assert check_linearizable(ops).valid == valid


def test_linearizability_search_is_bounded() -> None:
    # Many concurrent unknown writes and an impossible read: a huge search space.
    ops = [rop("write", f"v{i}", 0, None) for i in range(40)] + [rop("read", "nope", 1, 2)]
    res = check_linearizable(ops, max_steps=5_000)
    assert res.valid in (False, "unknown")
    assert res.steps <= 5_001


def test_linearizability_of_a_random_sequential_history() -> None:
    rng = random.Random(7)
    state: str | None = None
    ops = []
    for t in range(0, 3000, 3):
        dice = rng.random()
        if dice < 0.4:
            ops.append(rop("read", state, t, t + 1))
        elif dice < 0.7:
            state = f"w{t}"
            ops.append(rop("write", state, t, t + 1))
        else:
            expected = rng.choice([state, "other"])
            if expected == state:
                state = f"c{t}"
                ops.append(rop("cas", state, t, t + 1, expected=expected))
            else:
                ops.append(rop("cas-fail", None, t, t + 1, expected=expected))
    assert check_linearizable(ops).valid is True


# ---------------------------------------------------------------------------------------------- history -> checks


class H:
    """Builds histories with explicit times (milliseconds) through the real Recorder."""

    def __init__(self) -> None:
        self.now = 0
        self.rec = Recorder(clock=lambda: self.now)

    def op(self, process: int, workload: str, f: str, key: Any, value: Any, t0: int, t1: int | None,
           type_: str = "ok", result: Any = None, error: str | None = None, revision: int | None = None,
           result_key: Any = None) -> None:
        self.now = t0 * MS
        inv = self.rec.invoke(process, workload, f, key, value)
        if t1 is None:
            return
        self.now = t1 * MS
        self.rec.complete(inv, type_, result, key=result_key, error=error, revision=revision)

    def ops(self) -> list[Op]:
        # Events must be in time order, as a real recorder produces them.
        events = sorted(self.rec.events, key=lambda e: (e.time, e.index))
        paired: list[Op] = pair([Event(i, e.process, e.type, e.f, e.key, e.value, e.time, e.workload, e.error,
                                       e.revision, e.extra) for i, e in enumerate(events)])
        return paired


def test_register_history_through_pairing() -> None:
    h = H()
    h.op(1, "register", "write", "k", "a", 0, 1, revision=5)
    h.op(2, "register", "cas", "k", {"from": "a", "from_revision": 5, "to": "b"}, 2, 3, revision=6)
    h.op(3, "register", "cas", "k", {"from": "a", "from_revision": 5, "to": "c"}, 4, 5, "fail", error="CONFLICT")
    h.op(1, "register", "read", "k", None, 6, 7, result="b", revision=6)
    h.op(2, "register", "read", "other", None, 6, 7, result=None)
    res = check_register(h.ops())
    assert res.valid is True
    assert set(res.details["keys"]) == {"k", "other"}


def test_register_violation_reports_the_stuck_op() -> None:
    h = H()
    h.op(1, "register", "write", "k", "a", 0, 1)
    h.op(2, "register", "write", "k", "b", 2, 3)
    h.op(1, "register", "read", "k", None, 4, 5, result="a")
    res = check_register(h.ops())
    assert res.valid is False
    assert res.details["keys"]["k"]["stuck_op"]["f"] == "read"


def test_failed_reads_and_definitely_failed_writes_constrain_nothing() -> None:
    h = H()
    h.op(1, "register", "write", "k", "a", 0, 1)
    h.op(2, "register", "write", "k", "zzz", 2, 3, "fail", error="BAD_REQUEST")
    h.op(3, "register", "read", "k", None, 2, 3, "info", error="TIMEOUT")
    h.op(4, "register", "read", "k", None, 4, 5, result="a")
    assert check_register(h.ops()).valid is True


# ---------------------------------------------------------------------------------------------- set


def _set(*extra: tuple[Any, ...]) -> H:
    h = H()
    h.op(1, "set", "add", "s", "e1", 0, 1)
    h.op(2, "set", "add", "s", "e2", 0, 1, "info", error="TIMEOUT")
    h.op(3, "set", "add", "s", "e3", 2, 3)
    h.op(3, "set", "remove", "s", "e3", 4, 5)
    for args in extra:
        h.op(*args)
    return h


@pytest.mark.parametrize(
    ("name", "final", "valid", "kind"),
    [
        ("all there", ["e1"], True, None),
        ("unknown add present is fine", ["e1", "e2"], True, None),
        ("acknowledged add lost", [], False, "lost"),
        ("removed element comes back", ["e1", "e3"], False, "resurrected"),
        ("element never added", ["e1", "e9"], False, "unexpected"),
    ],
)
def test_set_final_read(name: str, final: list[str], valid: Any, kind: str | None) -> None:
    h = _set((9, "set", "read", "s", None, 10, 11, "ok", final))
    res = check_set(h.ops())
    assert res.valid == valid, res.details
    if kind is not None:
        assert res.details[kind]["count"] >= 1


def test_set_without_final_read_is_unknown() -> None:
    assert check_set(_set().ops()).valid == "unknown"


def test_set_stale_intermediate_read() -> None:
    h = _set((8, "set", "read", "s", None, 2, 3, "ok", []),  # concurrent with e3's add: fine
             (9, "set", "read", "s", None, 6, 7, "ok", []),  # e1 acknowledged at 1: missing
             (9, "set", "read", "s", None, 10, 11, "ok", ["e1"]))
    res = check_set(h.ops())
    assert res.valid is False
    assert res.details["stale-read"]["count"] == 1


def test_set_remove_not_found_means_lost() -> None:
    h = H()
    h.op(1, "set", "add", "s", "e1", 0, 1)
    h.op(1, "set", "remove", "s", "e1", 2, 3, "fail", error="NOT_FOUND")
    h.op(9, "set", "read", "s", None, 10, 11, "ok", [])
    res = check_set(h.ops())
    assert res.valid is False and res.details["lost"]["count"] == 1


# ---------------------------------------------------------------------------------------------- lease


def _lease(*extra: tuple[Any, ...]) -> list[Op]:
    h = H()
    h.op(1, "lease", "grant", None, 2000, 0, 10, result={"lease": 7, "ttl_ms": 2000}, result_key=7)
    h.op(1, "lease", "keepalive", 7, None, 1000, 1010, result=2000)
    for args in extra:
        h.op(*args)
    return h.ops()


@pytest.mark.parametrize(
    ("name", "extra", "valid"),
    [
        ("kept alive", [(1, "lease", "keepalive", 7, None, 2500, 2510, "ok", 2000)], True),
        ("lapsed after ttl", [(1, "lease", "keepalive", 7, None, 3500, 3510, "fail", None, "NOT_FOUND")], True),
        ("expired early", [(1, "lease", "keepalive", 7, None, 2000, 2010, "fail", None, "NOT_FOUND")], False),
        ("back after not found", [(1, "lease", "keepalive", 7, None, 3500, 3510, "fail", None, "NOT_FOUND"),
                                  (2, "lease", "keepalive", 7, None, 3600, 3610, "ok", 2000)], False),
        ("revoked is exempt", [(1, "lease", "revoke", 7, None, 1500, 1510, "ok"),
                               (1, "lease", "keepalive", 7, None, 1600, 1610, "fail", None, "NOT_FOUND")], True),
        ("info keepalive says nothing", [(1, "lease", "keepalive", 7, None, 1500, 3900, "info", None, "TIMEOUT")],
         True),
        ("probe finds it before the deadline", [(1, "lease", "probe", 7, None, 2700, 2710, "ok", {"ttl_ms": 2000})],
         True),
        ("probe misses it before the deadline", [(1, "lease", "probe", 7, None, 2700, 2710, "ok", None)], False),
        ("probe misses it after the deadline", [(1, "lease", "probe", 7, None, 3100, 3110, "ok", None)], True),
        ("a probe does not renew", [(1, "lease", "probe", 7, None, 2500, 2510, "ok", {"ttl_ms": 2000}),
                                    (1, "lease", "keepalive", 7, None, 3500, 3510, "fail", None, "NOT_FOUND")], True),
    ],
)
def test_lease(name: str, extra: list[tuple[Any, ...]], valid: bool) -> None:
    assert check_lease(_lease(*extra)).valid is valid


def test_lease_tolerates_a_fast_clock() -> None:
    ops = _lease((1, "lease", "keepalive", 7, None, 2000, 2010, "fail", None, "NOT_FOUND"))
    assert check_lease(ops, clock_rate_max=2.0).valid is True


# ---------------------------------------------------------------------------------------------- lock


def _acq(h: H, process: int, lease: int, t0: int, t1: int, token: int) -> None:
    h.op(process, "lock", "acquire", "L", {"lease": lease, "holder": f"p{process}"}, t0, t1,
         result={"token": token, "acquired": True}, revision=token)


def test_lock_clean_handover() -> None:
    h = H()
    _acq(h, 1, 10, 0, 1, 5)
    h.op(1, "lock", "keepalive", "L", {"lease": 10}, 2, 3, result=3000)
    h.op(1, "lock", "release", "L", {"lease": 10}, 4, 5, result={"revision": 6})
    _acq(h, 2, 11, 6, 7, 7)
    assert check_lock(h.ops()).valid is True


def test_lock_overlap_by_revisions() -> None:
    h = H()
    _acq(h, 1, 10, 0, 1, 5)
    _acq(h, 2, 11, 2, 3, 7)
    h.op(1, "lock", "release", "L", {"lease": 10}, 4, 5, result={"revision": 8})
    res = check_lock(h.ops())
    assert res.valid is False and res.details["overlap"]["count"] >= 1


def test_lock_overlap_by_keepalive() -> None:
    h = H()
    _acq(h, 1, 10, 0, 1, 5)
    _acq(h, 2, 11, 2, 3, 7)
    h.op(1, "lock", "keepalive", "L", {"lease": 10}, 4, 5, result=3000)
    h.op(1, "lock", "release", "L", {"lease": 10}, 6, 7, "fail", error="NOT_FOUND")
    res = check_lock(h.ops())
    assert res.valid is False and res.details["overlap"]["count"] >= 1


def test_lock_expired_holder_is_not_an_overlap() -> None:
    h = H()
    _acq(h, 1, 10, 0, 1, 5)
    _acq(h, 2, 11, 4000, 4001, 9)  # the first lease lapsed (no keepalive after this)
    h.op(1, "lock", "release", "L", {"lease": 10}, 4002, 4003, "fail", error="NOT_FOUND")
    assert check_lock(h.ops()).valid is True


def test_lock_token_order() -> None:
    h = H()
    _acq(h, 1, 10, 0, 1, 9)
    h.op(1, "lock", "release", "L", {"lease": 10}, 2, 3, result={"revision": 10})
    _acq(h, 2, 11, 4, 5, 8)
    res = check_lock(h.ops())
    assert res.valid is False and res.details["token-order"]["count"] == 1


# ---------------------------------------------------------------------------------------------- revisions


def test_revisions_never_go_backwards() -> None:
    h = H()
    h.op(1, "register", "write", "a", "x", 0, 1, revision=5)
    h.op(2, "register", "read", "b", None, 2, 3, result=None, revision=5)
    h.op(3, "register", "write", "b", "y", 4, 5, revision=6)
    assert check_revisions(h.ops()).valid is True
    h.op(4, "register", "read", "a", None, 6, 7, result="x", revision=4)
    assert check_revisions(h.ops()).valid is False


def test_revisions_a_later_write_needs_a_new_revision() -> None:
    h = H()
    h.op(1, "register", "write", "a", "x", 0, 1, revision=5)
    h.op(2, "register", "write", "a", "y", 2, 3, revision=5)
    assert check_revisions(h.ops()).valid is False


# ---------------------------------------------------------------------------------------------- watch

WATCH_WRITES: list[tuple[str, str, Any, int, int, str, int | None]] = [
    # f, key, value, t0, t1, outcome, revision
    ("put", "k0", "a", 0, 1, "ok", 1),
    ("put", "k1", "b", 2, 3, "ok", 2),
    ("delete", "k0", None, 4, 5, "ok", 3),
    ("put", "k1", "c", 6, 7, "ok", 4),
]


def ev(revision: int, type_: str, key: str, value: Any, t: int = 50) -> list[Any]:
    return ["event", revision, type_, key, value, t * MS]


GOOD_EVENTS = [ev(1, "put", "k0", "a"), ev(2, "put", "k1", "b"), ev(3, "delete", "k0", None), ev(4, "put", "k1", "c")]


def _watch(streams: list[list[list[Any]]], final: dict[str, list[Any]] | None = None, final_revision: int = 5,
           writes: list[tuple[str, str, Any, int, int, str, int | None]] | None = None) -> CheckResult:
    h = H()
    for n, (f, key, value, t0, t1, outcome, revision) in enumerate(writes if writes is not None else WATCH_WRITES):
        h.op(10 + n, "watch", f, key, value, t0, t1, outcome, revision=revision,
             error="NOT_FOUND" if outcome == "fail" else None)
    for n, items in enumerate(streams):
        h.op(100 + n, "watch", "watch", "w/", {"start_revision": 1, "node": f"n{n + 1}"}, 0, 60,
             result={"created": 0, "items": items})
    if final is not False:
        h.op(200, "watch", "final-read", "w/", None, 70, 71, result=final if final is not None else {"k1": ["c", 4]},
             revision=final_revision)
    return check_watch(h.ops())


def _both(items: list[list[Any]]) -> list[list[list[Any]]]:
    return [[*GOOD_EVENTS, ["progress", 5, 55 * MS]], items]


WATCH_CASES: list[tuple[str, list[list[list[Any]]], dict[str, Any], Any, str | None]] = [
    ("every stream gets every change", _both([*GOOD_EVENTS, ["progress", 5, 55 * MS]]), {}, True, None),
    ("a stream that ended early vouches for less", _both(GOOD_EVENTS[:2]), {}, True, None),
    ("gap: one change missing", _both([GOOD_EVENTS[0], *GOOD_EVENTS[2:]]), {}, False, "gap"),
    ("gap: progress past an undelivered change", _both([GOOD_EVENTS[0], ["progress", 5, 55 * MS]]), {}, False,
     "gap"),
    ("duplicate delivery", _both([*GOOD_EVENTS[:2], GOOD_EVENTS[1], *GOOD_EVENTS[2:]]), {}, False, "duplicate"),
    ("out of order", _both([GOOD_EVENTS[0], GOOD_EVENTS[2], GOOD_EVENTS[1], GOOD_EVENTS[3]]), {}, False,
     "out-of-order"),
    ("streams disagree on a revision", _both([*GOOD_EVENTS[:3], ev(4, "put", "k0", "c")]), {}, False, "disagree"),
    ("acknowledged write delivered nowhere", [[*GOOD_EVENTS, ["progress", 6, 55 * MS]]],
     {"writes": [*WATCH_WRITES, ("put", "k1", "d", 8, 9, "ok", 5)], "final": {"k1": ["c", 4]}}, False, "gap"),
    ("acknowledged write at another revision", [[*GOOD_EVENTS[:3], ev(5, "put", "k1", "c")]],
     {"final_revision": 5, "final": {"k1": ["c", 5]}}, False, "wrong-revision"),
    ("a failed write is visible", [[*GOOD_EVENTS, ev(5, "put", "k1", "z")]],
     {"writes": [*WATCH_WRITES, ("put", "k1", "z", 8, 9, "fail", None)], "final": {"k1": ["z", 5]}}, False,
     "phantom"),
    ("a value nobody wrote", [[*GOOD_EVENTS, ev(5, "put", "k1", "nobody")]], {"final": {"k1": ["nobody", 5]}},
     False, "phantom"),
    ("delivered before the write was invoked", [[*GOOD_EVENTS[:3], ev(4, "put", "k1", "c", t=5)]], {}, False,
     "phantom"),
    ("an unknown write may show up, on every stream", [[*GOOD_EVENTS, ev(5, "put", "k1", "e")]] * 2,
     {"writes": [*WATCH_WRITES, ("put", "k1", "e", 8, 9, "info", None)], "final": {"k1": ["e", 5]}}, True, None),
    ("an unknown write seen by one stream only", [[*GOOD_EVENTS, ev(5, "put", "k1", "e"), ["progress", 6, 0]],
                                                 [*GOOD_EVENTS, ["progress", 6, 0]]],
     {"writes": [*WATCH_WRITES, ("put", "k1", "e", 8, 9, "info", None)], "final": {"k1": ["e", 5]}}, False, "gap"),
    ("final read disagrees (lost write)", _both(GOOD_EVENTS), {"final": {"k1": ["b", 2]}}, False,
     "final-read-mismatch"),
    ("final read disagrees (deleted key back)", _both(GOOD_EVENTS), {"final": {"k0": ["a", 1], "k1": ["c", 4]}},
     False, "final-read-mismatch"),
    ("resync snapshot that matches", _both([GOOD_EVENTS[0], ["snapshot", 3, {"k1": ["b", 2]}, 0], GOOD_EVENTS[3]]),
     {}, True, None),
    ("resync snapshot that does not match", _both([GOOD_EVENTS[0], ["snapshot", 3, {"k1": ["x", 2]}, 0],
                                                  GOOD_EVENTS[3]]), {}, False, "snapshot-mismatch"),
    ("no final read", _both(GOOD_EVENTS), {"final": False}, "unknown", None),
    ("streams do not reach the final read", [GOOD_EVENTS[:2]], {}, "unknown", None),
]


@pytest.mark.parametrize(("name", "streams", "kw", "valid", "kind"), WATCH_CASES, ids=[c[0] for c in WATCH_CASES])
def test_watch(name: str, streams: list[list[list[Any]]], kw: dict[str, Any], valid: Any, kind: str | None) -> None:
    res = check_watch_case(streams, kw)
    assert res.valid == valid, res.details
    if kind is not None:
        assert res.details[kind]["count"] >= 1, res.details


def check_watch_case(streams: list[list[list[Any]]], kw: dict[str, Any]) -> CheckResult:
    return _watch(streams, **kw)


def test_watch_several_changes_in_one_revision() -> None:
    writes = [("put", "k0", "a", 0, 1, "ok", 1), ("put", "k1", "b", 0, 1, "info", None)]
    # e.g. a lease expiry removing two keys in one revision: both changes share revision 2.
    writes += [("delete", "k0", None, 2, 3, "info", None), ("delete", "k1", None, 2, 3, "info", None)]
    items = [ev(1, "put", "k0", "a"), ev(1, "put", "k1", "b"), ev(2, "delete", "k0", None),
             ev(2, "delete", "k1", None), ["progress", 3, 0]]
    res = _watch([items, list(items)], final={}, final_revision=3, writes=writes)
    assert res.valid is True, res.details


# ---------------------------------------------------------------------------------------------- misc


def test_merge_valid() -> None:
    assert merge_valid([]) is True
    assert merge_valid([True, "unknown"]) == "unknown"
    assert merge_valid([True, "unknown", False]) is False


def test_pairing_leaves_unfinished_ops_as_info() -> None:
    h = H()
    h.op(1, "register", "write", "k", "a", 0, None)
    (op,) = h.ops()
    assert op.type == "info" and op.complete_time is None


def test_schedule_is_a_function_of_the_seed() -> None:
    assert plan(3, ["kill", "pause"], 60) == plan(3, ["kill", "pause"], 60)
    assert plan(3, ["kill", "pause"], 60) != plan(4, ["kill", "pause"], 60)
    faults = plan(3, ["kill", "pause", "partition", "clock"], 60)
    assert faults and all(f.start_s + f.duration_s <= 59 for f in faults)
    assert all(b.start_s >= a.start_s + a.duration_s for a, b in itertools.pairwise(faults))
    assert plan(3, [], 60) == []


@pytest.mark.parametrize("shape", ["isolate-leader", "isolate-node", "halves", "bridge", "syn-drop"])
def test_partition_shapes(shape: str) -> None:
    nodes = ["n1", "n2", "n3"]
    rules = partition_groups(shape, nodes, "n2", 12345)
    assert rules
    assert all(dst != src and dst in nodes and src in nodes for dst, src, _ in rules)
    if shape == "isolate-leader":
        assert {(d, s) for d, s, _ in rules} == {("n2", "n1"), ("n1", "n2"), ("n2", "n3"), ("n3", "n2")}
    if shape == "syn-drop":
        assert rules[0][1] == "n2" and rules[0][2] is True


def test_membership_changes_are_planned() -> None:
    faults = plan(5, ["membership"], 120)
    assert faults and {f.kind for f in faults} == {"membership"}
    assert {f.target for f in faults} == {"remove-follower", "add-node"}


# ---------------------------------------------------------------------------------------------- report


def _report_history() -> list[Op]:
    h = H()
    h.op(1, "register", "write", "k", "a", 0, 10, revision=1)
    h.op(1, "register", "read", "k", None, 20, 30, result="a", revision=1)
    h.op(2, "register", "write", "k", "b", 25, None)  # never completed: info to the end
    h.op(3, "register", "read", "k", None, 3000, 3050, result="a", revision=1)
    h.op(4, "watch", "watch", "w/", {"start_revision": 1}, 0, 3100, result={"created": 0, "items": []})
    return h.ops()


def test_unavailability_windows() -> None:
    ops = _report_history()
    res = unavailability(ops, 0, 4000 * MS, threshold_s=1.0)
    # ok completions at 10, 30 and 3050 ms (the watch stream does not count): 30 -> 3050 and 3050 -> 4000 ms.
    assert res["count"] == 1 and res["windows"][0] == {"start_s": 0.03, "duration_s": 3.02}
    assert unavailability(ops, 0, 4100 * MS)["count"] == 2


def test_latency_summary_leaves_streams_out() -> None:
    res = latency_summary(_report_history(), 0, 4000 * MS)
    assert res["all"]["n"] == 3
    assert res["by_op"]["register/read"] == {"n": 2, "p50": 10.0, "p95": 50.0, "p99": 50.0, "max": 50.0}
    assert "watch/watch" not in res["by_op"]


def test_lanes_merge_and_report_page() -> None:
    ops = _report_history()
    svg = lanes_svg(ops, [{"kind": "pause", "target": "leader", "start_ns": 100 * MS, "end_ns": 200 * MS}], 0,
                    4000 * MS)
    assert svg.startswith("<svg") and svg.count("<rect") >= 5
    results = {"valid": False, "seed": 9, "replay": "jepsen-lite/run --seed 9", "checkers": {
        "watch": {"valid": False, "gap": {"count": 1, "examples": [{"revision": 3}]}, "counts": {"streams": 2}}},
        "faults": [{"kind": "pause", "target": "leader", "nodes": ["n1"], "start_s": 0.1, "duration_s": 0.1}]}
    page = report_html(results, ops, [], 0, title="t")
    assert "valid = False" in page and "jepsen-lite/run --seed 9" in page and "gap: 1" in page
    assert page.count("<svg") == 2 and "<script" not in page
