"""Property tests of the state machine: random command sequences (valid-ish and garbage)."""

from __future__ import annotations

from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from registry.errors import BadRequest, LimitExceeded, RegistryError
from registry.fsm.commands import OPS, is_normalised, validate_command
from registry.fsm.state import RegistryState

# Moderate counts: the whole file must stay well under 20 s.
SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# Small pools so commands collide on the same records often.  Every field is
# valid here; invalid values come from ``corrupted`` and ``garbage`` below, so
# that most commands succeed and sequences build real state.
services = st.sampled_from(["a", "b", "c"])
ids = st.sampled_from(["i1", "i2", "i3"])
lease_ids = st.sampled_from([1, 1, 2, 2, 3, 4])
leases = st.sampled_from([None, None, 1, 2, 3])
keys = st.sampled_from(["k1", "k2", "dir/k3"])
locks = st.sampled_from(["L1", "L2", "jobs/x"])
guards = st.sampled_from([None] * 6 + [0, 1, 2, 5])
statuses = st.sampled_from(["passing", "warning", "critical"])
metas = st.dictionaries(st.sampled_from(["m1", "m2"]), st.text(max_size=4), max_size=2)
tags = st.lists(st.sampled_from(["t1", "t2"]), max_size=3)
rids = st.one_of(st.none(), st.sampled_from([f"r{i}" for i in range(8)]))


def _cmd(op: str, **fields: Any) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"op": st.just(op), **fields}, optional={"rid": rids, "now_ms": st.integers(0, 10**6)}
    )


# sampled_from + flatmap picks ops uniformly (one_of favours early branches).
valid = st.sampled_from(
    [
        _cmd("service_put", name=services, meta=metas, tags=tags),
        _cmd("service_delete", name=services),
        _cmd(
            "register",
            service=services,
            id=ids,
            address=st.sampled_from(["10.0.0.1", "h"]),
            port=st.integers(1, 3),
            weight=st.integers(1, 2),
            status=statuses,
            meta=metas,
            tags=tags,
            lease=leases,
            if_mod_revision=guards,
        ),
        _cmd("deregister", service=services, id=ids),
        _cmd("set_status", service=services, id=ids, status=statuses, note=st.text(max_size=3)),
        st.fixed_dictionaries(
            {
                "op": st.just("lease_grant"),
                "ttl_ms": st.sampled_from([1000, 5000, 86_400_000]),
                "now_ms": st.integers(0, 10**6),
            },
            optional={"rid": rids},
        ),
        _cmd("lease_revoke", lease=lease_ids),
        _cmd("lease_expire", leases=st.lists(lease_ids, max_size=3), epoch=st.integers(0, 4)),
        _cmd("leader_epoch", epoch=st.integers(0, 4)),
        _cmd("key_put", key=keys, value=st.text(max_size=5), lease=leases, if_mod_revision=guards),
        _cmd("key_delete", key=keys, if_mod_revision=guards),
        _cmd("lock_acquire", name=locks, lease=lease_ids, holder=st.text(max_size=3)),
        _cmd("lock_release", name=locks, lease=lease_ids),
        _cmd("barrier"),
    ]
).flatmap(lambda strategy: strategy)

# Values that break some field: out of range, wrong pattern, wrong type.
bad_values = st.sampled_from(
    [-1, 0, 2**63, 999, 86_400_001, 65536, 1001, "", "-bad", "a b", "bogus", "\ud800", True, None, 1.5, b"x",
     [], {}, ["t 3"], {"bad key": ""}, [0], "x" * 129]
)  # fmt: skip


@st.composite
def corrupted(draw: st.DrawFn) -> dict[str, Any]:
    """A valid command with one field replaced (or one unknown field added)."""
    cmd: dict[str, Any] = dict(draw(valid))
    field = draw(st.sampled_from([*sorted(cmd), "bogus_field"]))
    cmd[field] = draw(bad_values)
    return cmd


_FIELD_NAMES = sorted(
    {
        "op",
        "rid",
        "now_ms",
        "name",
        "service",
        "id",
        "lease",
        "leases",
        "key",
        "value",
        "epoch",
        "port",
        "meta",
    }
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**65), 2**65),
    st.floats(allow_nan=False),
    st.text(max_size=6),
    st.binary(max_size=4),
)
junk_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.one_of(st.text(max_size=3), st.integers()), inner, max_size=3),
    ),
    max_leaves=6,
)
garbage = st.one_of(
    junk_values,
    st.dictionaries(
        st.one_of(st.sampled_from(_FIELD_NAMES), st.text(max_size=4)),
        st.one_of(st.sampled_from(sorted(OPS)), junk_values),
        max_size=5,
    ),
    # A real op with garbage in its fields.
    st.builds(
        lambda op, extra: {**extra, "op": op},
        st.sampled_from(sorted(OPS)),
        st.dictionaries(st.sampled_from(_FIELD_NAMES), junk_values, max_size=4),
    ),
)

_KINDS: dict[str, st.SearchStrategy[Any]] = {"valid": valid, "corrupted": corrupted(), "garbage": garbage}
# sampled_from is uniform: about 70% valid commands, 15% corrupted, 15% garbage.
command = st.sampled_from(["valid"] * 5 + ["corrupted", "garbage"]).flatmap(_KINDS.__getitem__)
_GRANT = {"op": "lease_grant", "ttl_ms": 5000, "now_ms": 0}
_WORLD = [
    _GRANT,
    _GRANT,
    {"op": "register", "service": "a", "id": "i1", "address": "h", "port": 1, "lease": 1},
    {"op": "register", "service": "a", "id": "i2", "address": "h", "port": 1},
    {"op": "register", "service": "b", "id": "i1", "address": "h", "port": 1, "lease": 2},
    {"op": "key_put", "key": "k1", "value": "v", "lease": 1},
    {"op": "key_put", "key": "k2", "value": "v"},
    {"op": "lock_acquire", "name": "L1", "lease": 1},
]
# Most sequences start from a populated world so that deletes, status changes
# and lease revocations have something to act on.
commands = st.builds(
    lambda prefix, cmds: prefix + cmds,
    st.sampled_from([[], _WORLD, _WORLD]),
    st.lists(command, min_size=1, max_size=40),
)


def _without_dedup(snapshot: bytes) -> dict[str, Any]:
    obj: dict[str, Any] = msgpack.unpackb(snapshot)
    obj.pop("dedup")
    return obj


def _run(state: RegistryState, cmds: list[Any]) -> list[Any]:
    """Apply all commands; return the observable outcome of each."""
    outcomes: list[Any] = []
    for cmd in cmds:
        try:
            applied = state.apply(cmd)
        except RegistryError as err:
            outcomes.append((err.code, err.message))
        else:
            outcomes.append((applied.result, applied.events))
    return outcomes


def _valid(cmd: Any) -> dict[str, Any] | None:
    try:
        return validate_command(cmd)
    except BadRequest:
        return None


@SETTINGS
@given(commands)
def test_apply_properties(cmds: list[Any]) -> None:
    state = RegistryState()
    recorded: set[str] = set()  # rids whose outcome the state remembers
    for cmd in cmds:
        before_rev = state.revision
        before_snap = state.snapshot()
        normalised = _valid(cmd)
        rid = None if normalised is None or normalised["op"] == "barrier" else normalised["rid"]
        replay = rid is not None and rid in recorded
        try:
            applied = state.apply(cmd)
        except RegistryError as err:
            # Only registry errors escape, and a failing command changes nothing
            # except (for a valid command with a rid) the remembered outcome.
            assert state.revision == before_rev
            assert (normalised is None) == isinstance(err, BadRequest) or isinstance(err, LimitExceeded)
            after = state.snapshot()
            if rid is None or replay:
                assert after == before_snap
            else:
                assert _without_dedup(after) == _without_dedup(before_snap)
        else:
            assert normalised is not None
            assert validate_command(normalised) == normalised
            delta = state.revision - before_rev
            assert delta in (0, 1)
            msgpack.packb([applied.result, applied.events])
            if replay:
                # The stored outcome, not a re-application.
                assert delta == 0 and applied.events == []
                assert applied.result["revision"] <= state.revision
                assert state.snapshot() == before_snap
            else:
                assert applied.result["revision"] == state.revision
                assert bool(applied.events) == (delta == 1)
                assert all(e["revision"] == state.revision for e in applied.events)
                if delta == 0 and rid is None:
                    # No revision, no dedup entry: only the epoch may have moved.
                    a, b = _without_dedup(state.snapshot()), _without_dedup(before_snap)
                    a.pop("epoch")
                    b.pop("epoch")
                    assert a == b
        if rid is not None:
            recorded.add(rid)
        state.check_invariants()
    snap = state.snapshot()
    assert RegistryState.restore(snap).snapshot() == snap


@SETTINGS
@given(commands, st.data())
def test_determinism_and_restore_midway(cmds: list[Any], data: st.DataObject) -> None:
    a, b = RegistryState(), RegistryState()
    assert _run(a, cmds) == _run(b, cmds)
    assert a.snapshot() == b.snapshot()
    # A replica that restores from a snapshot taken midway and then applies
    # the rest behaves exactly like one that applied everything.
    split = data.draw(st.integers(0, len(cmds)))
    c = RegistryState()
    _run(c, cmds[:split])
    d = RegistryState.restore(c.snapshot())
    assert _run(c, cmds[split:]) == _run(d, cmds[split:])
    assert c.snapshot() == d.snapshot() == a.snapshot()


@SETTINGS
@given(st.binary(max_size=200))
def test_restore_garbage_bytes(data: bytes) -> None:
    try:
        RegistryState.restore(data)
    except BadRequest:
        pass


@SETTINGS
@given(commands, st.integers(0, 10_000), st.binary(min_size=1, max_size=3))
def test_restore_bitflipped_snapshot(cmds: list[Any], pos: int, patch: bytes) -> None:
    state = RegistryState()
    _run(state, cmds)
    snap = bytearray(state.snapshot())
    pos %= len(snap)
    snap[pos : pos + len(patch)] = patch
    try:
        restored = RegistryState.restore(bytes(snap))
    except BadRequest:
        return
    # Whatever was accepted is a consistent, re-snapshottable state.
    restored.check_invariants()
    again = restored.snapshot()
    assert RegistryState.restore(again).snapshot() == again


def _through_log(cmd: Any) -> Any:
    """What a replica's apply gets: the command after a msgpack round trip (as in a Raft entry)."""
    try:
        return msgpack.unpackb(msgpack.packb(cmd, use_bin_type=True), raw=False)
    except (TypeError, ValueError, OverflowError):
        return cmd


@SETTINGS
@given(commands)
def test_trusted_apply_matches_full_validation(cmds: list[Any]) -> None:
    """apply(trusted=True) (the Raft apply path) behaves exactly like apply() on every input.

    Validated commands take the structural guard instead of re-validation and must give the
    same results, events and state; anything else (garbage, unnormalised commands) must fall
    back to full validation and fail or succeed the same way.
    """
    full, trusted = RegistryState(), RegistryState()
    for cmd in cmds:
        normalised = _valid(cmd)
        if normalised is not None:
            assert is_normalised(_through_log(normalised))
        expected = _run(full, [cmd])
        for candidate in (cmd if normalised is None else _through_log(normalised),):
            try:
                applied = trusted.apply(candidate, trusted=True)
            except RegistryError as err:
                got: Any = (err.code, err.message)
            else:
                got = (applied.result, applied.events)
            assert [got] == expected
        assert trusted.snapshot() == full.snapshot()


@SETTINGS
@given(commands)
def test_guard_refuses_what_validation_would_change(cmds: list[Any]) -> None:
    """is_normalised accepts a command only if validation would return it unchanged."""
    for cmd in cmds:
        if isinstance(cmd, dict) and is_normalised(cmd):
            try:
                assert validate_command(cmd) == cmd
            except BadRequest:
                # The guard checks shape and types, not values (proposers validated those).
                pass
