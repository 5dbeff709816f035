"""A total byte budget on the replicated state (issue #20, finding 8).

Before, only counts and lengths were capped: 1M keys x 64 KiB was allowed, and
one token with write on one key prefix could run every replica out of memory
at once.  ``StateLimits.state_bytes_max`` bounds the estimate that
``RegistryState.state_bytes`` keeps; every replica refuses the same writes.
"""

from __future__ import annotations

from typing import Any

import pytest

from registry.errors import InvalidArgument, LimitExceeded
from registry.fsm.limits import StateLimits
from registry.fsm.state import RegistryState

BUDGET = 64 << 10


def small() -> RegistryState:
    return RegistryState(StateLimits(state_bytes_max=BUDGET))


def put(key: str, chars: int) -> dict[str, Any]:
    return {"op": "key_put", "key": key, "value": "v" * chars}


def register(iid: str, meta_chars: int = 0) -> dict[str, Any]:
    meta = {"blob": "m" * meta_chars} if meta_chars else {}
    return {"op": "register", "service": "web", "id": iid, "address": "10.0.0.1", "port": 80, "meta": meta}


def fill(st: RegistryState) -> int:
    """Keys of 8 KiB until the budget refuses one, then small ones; returns how many big ones fit."""
    stored = 0
    for chars in (8 << 10, 10):
        i = 0
        while True:
            try:
                st.apply(put(f"k/{chars}/{i}", chars))
            except LimitExceeded:
                break
            i += 1
        stored = stored or i
    return stored


def test_writes_stop_at_the_budget_and_leave_the_state_unchanged() -> None:
    st = small()
    stored = fill(st)
    assert 0 < stored < BUDGET // (8 << 10)
    assert st.state_bytes <= BUDGET
    before = st.snapshot()
    for command in (put("k/new", 8 << 10), register("w1", 1000), {"op": "service_put", "name": "big",
                                                                   "meta": {"m": "x" * 1000}}):
        with pytest.raises(LimitExceeded, match="state_bytes_max"):
            st.apply(command)
    assert st.snapshot() == before


def test_deleting_and_shrinking_always_pass_and_free_room() -> None:
    st = small()
    stored = fill(st)
    st.apply(put(f"k/{8 << 10}/0", 10))  # shrinking an existing key passes at the budget
    st.apply({"op": "key_delete", "key": f"k/{8 << 10}/1"})
    st.apply(put("k/again", 8 << 10))  # the room freed is usable again
    assert stored >= 2


@pytest.mark.parametrize(
    "commands",
    [
        [put("a", 100), put("a", 5000), put("a", 10), {"op": "key_delete", "key": "a"}],
        [register("w1", 300), register("w1", 10), {"op": "set_status", "service": "web", "id": "w1",
                                                    "status": "critical", "note": "n" * 200},
         {"op": "deregister", "service": "web", "id": "w1"}],
        [register("w1"), register("w2"), {"op": "service_delete", "name": "web"}],
        [{"op": "lease_grant", "ttl_ms": 5000, "now_ms": 1}, {**register("w1"), "lease": 1},
         {**put("k", 100), "lease": 1}, {"op": "lease_revoke", "lease": 1}],
    ],
)
def test_the_count_follows_every_change_and_survives_a_snapshot(commands: list[dict[str, Any]]) -> None:
    st = RegistryState()
    for command in commands:
        st.apply(command)
        st.check_invariants()  # the running count equals a recount
    restored = RegistryState.restore(st.snapshot())
    assert restored.state_bytes == st.state_bytes


def test_a_restored_state_over_its_budget_loads_and_refuses_growth() -> None:
    big = RegistryState()
    for i in range(20):
        big.apply(put(f"k/{i}", 8 << 10))
    restored = RegistryState.restore(big.snapshot(), StateLimits(state_bytes_max=BUDGET))
    assert restored.state_bytes > BUDGET
    with pytest.raises(LimitExceeded):
        restored.apply(put("one/more", 1))
    restored.apply({"op": "key_delete", "key": "k/0"})


# -- the budget in force is replicated: the newest leader's announcement ---------------------------


@pytest.mark.parametrize(
    ("announcements", "want"),
    [
        ([], 2 << 30),  # no leader announced one: StateLimits' default, the same on every replica
        ([(3, 4 << 20)], 4 << 20),
        ([(3, 4 << 20), (4, 8 << 20)], 8 << 20),  # a newer leader's value replaces it
        ([(4, 8 << 20), (3, 4 << 20)], 8 << 20),  # a stale leader's announcement changes nothing
        ([(3, 4 << 20), (4, None)], 4 << 20),  # a leader announcing none keeps the budget in force
    ],
    ids=["default", "announced", "newer-wins", "stale-ignored", "none-keeps"],
)
def test_the_newest_leaders_budget_governs(announcements: list[tuple[int, int | None]], want: int) -> None:
    st = RegistryState()
    for epoch, budget in announcements:
        st.apply({"op": "leader_epoch", "epoch": epoch, "state_bytes_max": budget})
    assert st.state_bytes_budget == want
    # And a replica restored from a snapshot enforces the same one.
    assert RegistryState.restore(st.snapshot()).state_bytes_budget == want


def test_an_announced_budget_refuses_writes_on_every_replica_alike() -> None:
    replicas = [RegistryState(), RegistryState(StateLimits(state_bytes_max=1 << 30))]  # local defaults differ
    value = "x" * 60_000
    for st in replicas:
        st.apply({"op": "leader_epoch", "epoch": 1, "state_bytes_max": 1 << 20})
    outcomes: list[list[str]] = [[], []]
    for i in range(40):
        for st, seen in zip(replicas, outcomes, strict=True):
            try:
                st.apply({"op": "key_put", "key": f"k{i}", "value": value})
                seen.append("ok")
            except LimitExceeded:
                seen.append("refused")
    assert outcomes[0] == outcomes[1] and "refused" in outcomes[0]


@pytest.mark.parametrize("bad", [0, (1 << 20) - 1, -5])
def test_a_budget_below_one_mib_is_refused(bad: int) -> None:
    with pytest.raises(InvalidArgument):
        RegistryState().apply({"op": "leader_epoch", "epoch": 1, "state_bytes_max": bad})
