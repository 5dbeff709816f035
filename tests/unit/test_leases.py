"""LeaseKeeper with a fake clock: ``now`` is always passed in, never read."""

from __future__ import annotations

import pytest

from registry.errors import NotFound
from registry.fsm.leases import LeaseKeeper, StallGuard

#: The service ticks every 0.1 s; the fake clock does the same.
STEP = 0.1


def ticks(keeper: LeaseKeeper, start: float, end: float, **kwargs: float) -> list[tuple[float, list[int]]]:
    """Tick regularly from ``start`` (exclusive) to ``end`` (inclusive); return the non-empty results."""
    out = []
    n = 1
    while True:
        now = round(start + n * STEP, 6)
        if now > end + 1e-9:
            return out
        result = keeper.tick(now, **kwargs)
        if result.due:
            out.append((now, result.due))
        n += 1


def first_due(keeper: LeaseKeeper, start: float, end: float) -> dict[int, float]:
    """Tick regularly; the time at which each lease was first returned as due."""
    seen: dict[int, float] = {}
    for now, due in ticks(keeper, start, end):
        for lease in due:
            seen.setdefault(lease, now)
    return seen


def leader(ttls_ms: dict[int, int], now: float = 0.0, guard: StallGuard | None = None) -> LeaseKeeper:
    keeper = LeaseKeeper(guard)
    for lease, ttl in ttls_ms.items():
        keeper.granted(lease, ttl, now)
    keeper.reset_all(ttls_ms, now)
    return keeper


# -- reset_all ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ttls_ms", "reset_at", "expect_due_at"),
    [
        ({1: 1000}, 0.0, {1: 1.0}),
        ({1: 2000, 2: 5000}, 10.0, {1: 12.0, 2: 15.0}),
        # A lease granted long ago still gets its full TTL from the reset.
        ({7: 3000}, 1000.0, {7: 1003.0}),
    ],
)
def test_reset_all_gives_every_lease_its_full_ttl(
    ttls_ms: dict[int, int], reset_at: float, expect_due_at: dict[int, float]
) -> None:
    keeper = LeaseKeeper()
    for lease in ttls_ms:
        keeper.granted(lease, 500, reset_at - 100)  # stale follower-side knowledge: replaced by the reset
    keeper.reset_all(ttls_ms, reset_at)
    assert keeper.active
    assert len(keeper) == len(ttls_ms)
    for lease, ttl in ttls_ms.items():
        assert keeper.remaining_ms(lease, reset_at) == ttl
    got = first_due(keeper, reset_at, reset_at + 20)
    assert got.keys() == expect_due_at.keys()
    for lease, at in expect_due_at.items():
        assert got[lease] == pytest.approx(at, abs=STEP + 1e-6)
        assert got[lease] >= at - 1e-9, "a lease fell due before its TTL"


def test_reset_all_forgets_deferrals_and_pending_expiries() -> None:
    keeper = leader({1: 1000})
    assert ticks(keeper, 0.0, 1.0) == [(1.0, [1])]
    keeper.reset_all({1: 1000}, 5.0)
    # The pending expiry was forgotten: keepalive works and the countdown restarted.
    assert keeper.keepalive(1, 5.0) == 1000
    assert keeper.remaining_ms(1, 5.5) == 500


def test_granted_while_leading_starts_the_countdown_and_while_following_does_not() -> None:
    keeper = LeaseKeeper()
    keeper.granted(1, 1000, 0.0)
    assert not keeper.active
    assert keeper.tick(50.0).due == []
    with pytest.raises(NotFound):
        keeper.remaining_ms(1, 0.0)
    keeper.reset_all({1: 1000}, 100.0)
    keeper.granted(2, 4000, 100.5)
    assert keeper.remaining_ms(2, 101.0) == 3500
    assert first_due(keeper, 100.0, 106.0) == {1: pytest.approx(101.0), 2: pytest.approx(104.5)}


# -- keepalive ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ttl_ms", "keepalive_at", "expect_due_at"),
    [
        (1000, [0.5], 1.5),
        (1000, [0.5, 1.2, 2.0], 3.0),
        (3000, [2.9], 5.9),
        # A keepalive long before the deadline still moves it to now + TTL (never backwards past it).
        (10_000, [0.1], 10.1),
    ],
)
def test_keepalive_moves_the_deadline_and_returns_the_ttl(
    ttl_ms: int, keepalive_at: list[float], expect_due_at: float
) -> None:
    keeper = leader({1: ttl_ms})
    now = 0.0
    for at in keepalive_at:
        assert ticks(keeper, now, at) == []
        now = at
        assert keeper.keepalive(1, at) == ttl_ms
        assert keeper.remaining_ms(1, at) == pytest.approx(ttl_ms, abs=1)
    got = first_due(keeper, now, now + ttl_ms / 1000 + 1)
    assert got[1] == pytest.approx(expect_due_at, abs=STEP + 1e-6)
    assert got[1] >= expect_due_at - 1e-9


@pytest.mark.parametrize("lease", [0, 2, 999, -1])
def test_keepalive_and_remaining_of_unknown_lease_raise_not_found(lease: int) -> None:
    keeper = leader({1: 1000})
    with pytest.raises(NotFound):
        keeper.keepalive(lease, 0.1)
    with pytest.raises(NotFound):
        keeper.remaining_ms(lease, 0.1)
    # Nothing was created by asking.
    assert len(keeper) == 1
    assert first_due(keeper, 0.0, 3.0) == {1: pytest.approx(1.0)}


def test_keepalive_of_a_lease_being_expired_is_not_found() -> None:
    keeper = leader({1: 1000})
    assert ticks(keeper, 0.0, 1.0) == [(1.0, [1])]
    with pytest.raises(NotFound):
        keeper.keepalive(1, 1.05)
    with pytest.raises(NotFound):
        keeper.remaining_ms(1, 1.05)


def test_remaining_ms_counts_down_and_floors_at_zero() -> None:
    keeper = leader({1: 2000})
    assert keeper.remaining_ms(1, 0.0) == 2000
    assert keeper.remaining_ms(1, 0.5) == 1500
    assert keeper.remaining_ms(1, 1.75) == 250
    assert keeper.remaining_ms(1, 2.0) == 0
    assert keeper.remaining_ms(1, 2.05) == 0  # between the deadline and the tick that catches it


# -- due, and not proposed twice -------------------------------------------------


@pytest.mark.parametrize(
    ("retry_s", "expect_times"),
    [
        (4.95, [1.0, 6.0, 11.0]),
        (2.05, [1.0, 3.1, 5.2, 7.3, 9.4, 11.5]),
    ],
)
def test_due_lease_is_returned_once_until_the_retry_interval(retry_s: float, expect_times: list[float]) -> None:
    keeper = leader({1: 1000, 2: 60_000})
    got = ticks(keeper, 0.0, 12.0, expiring_retry_s=retry_s)
    # Lease 1 keeps being due (its expiry "never commits" here); it is re-proposed only after retry_s.
    assert [due for _, due in got] == [[1]] * len(expect_times)
    assert [at for at, _ in got] == pytest.approx(expect_times, abs=1e-6)


def test_due_leases_come_back_sorted_and_together() -> None:
    keeper = leader({5: 1000, 3: 1000, 9: 1000, 4: 2000})
    got = ticks(keeper, 0.0, 3.0)
    assert got == [(1.0, [3, 5, 9]), (2.0, [4])]


def test_removed_after_due_cleans_up() -> None:
    keeper = leader({1: 1000, 2: 5000})
    assert ticks(keeper, 0.0, 1.0) == [(1.0, [1])]
    keeper.removed(1)  # the expiry committed
    assert len(keeper) == 1
    # Never returned again, even after the retry interval.
    assert ticks(keeper, 1.0, 4.9, expiring_retry_s=0.5) == []
    with pytest.raises(NotFound):
        keeper.keepalive(1, 2.0)


# -- deactivate / removed -----------------------------------------------------------


def test_deactivate_forgets_deadlines_but_keeps_knowing_the_leases() -> None:
    keeper = leader({1: 1000, 2: 1000})
    assert ticks(keeper, 0.0, 1.0) == [(1.0, [1, 2])]
    keeper.deactivate()
    assert not keeper.active
    assert len(keeper) == 2
    assert keeper.tick(100.0).due == []
    with pytest.raises(NotFound):
        keeper.remaining_ms(1, 100.0)
    # Leading again: a fresh countdown, nothing remembered as "expiring" or "deferred".
    keeper.reset_all({1: 1000, 2: 1000}, 200.0)
    assert keeper.remaining_ms(1, 200.0) == 1000
    assert ticks(keeper, 200.0, 201.0) == [(201.0, [1, 2])]


def test_removed_cleans_everything() -> None:
    keeper = leader({i: 1000 for i in range(1, 21)})
    # Defer all 20 (a mass expiry), then mark one of them expiring on the second round.
    assert ticks(keeper, 0.0, 1.0) == []
    keeper.removed(1)  # deferred
    assert ticks(keeper, 1.0, 2.0) == [(2.0, list(range(2, 21)))]
    keeper.removed(2)  # expiring
    keeper.removed(999)  # unknown: a no-op
    for lease in (1, 2):
        with pytest.raises(NotFound):
            keeper.keepalive(lease, 2.0)
        with pytest.raises(NotFound):
            keeper.remaining_ms(lease, 2.0)
    assert len(keeper) == 18
    assert 1 not in keeper._deferred and 2 not in keeper._expiring
    assert 1 not in keeper._deadline and 2 not in keeper._deadline
    # A later grant with a reused id (never happens in the state machine, but the keeper must not care)
    # starts from scratch: it is not "already deferred".
    keeper.granted(1, 1000, 2.0)
    assert keeper.keepalive(1, 2.0) == 1000


# -- stall guard ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ttl_ms", "last_tick", "woke_at", "expect_remaining_ms"),
    [
        # Paused 3 s with 9.5 s left: the deadline moves forward by the whole gap.
        (10_000, 0.5, 3.5, 9500),
        # Gap 4 s > TTL 2 s: compensation is capped at the TTL.
        (2_000, 0.1, 4.1, 0),
        # Gap exactly at stall_s (1.0 s) is not a stall: no compensation.
        (5_000, 1.0, 2.0, 3000),
        # Just over stall_s: compensated.
        (5_000, 1.0, 2.2, 4000),
    ],
)
def test_stall_pushes_deadlines_forward_by_the_gap_at_most_the_ttl(
    ttl_ms: int, last_tick: float, woke_at: float, expect_remaining_ms: int
) -> None:
    keeper = leader({1: ttl_ms})
    assert ticks(keeper, 0.0, last_tick) == []
    result = keeper.tick(woke_at)
    gap = woke_at - last_tick
    if gap > keeper.guard.stall_s:
        assert result.stall_s == pytest.approx(gap)
    else:
        assert result.stall_s == 0.0
    deadline_before = ttl_ms / 1000
    expected_deadline = deadline_before + (min(gap, ttl_ms / 1000) if gap > keeper.guard.stall_s else 0.0)
    if expected_deadline <= woke_at:
        assert result.due == [1]
    else:
        assert result.due == []
        assert keeper.remaining_ms(1, woke_at) == pytest.approx(expect_remaining_ms, abs=1)


def test_stall_saves_leases_whose_keepalives_were_stuck_during_the_pause() -> None:
    keeper = leader({1: 3000, 2: 3000})
    for t in (1.0, 2.0):
        assert ticks(keeper, t - 1.0, t) == []
        keeper.keepalive(1, t)
        keeper.keepalive(2, t)
    # Paused from 2.0 to 4.5 (both deadlines, 5.0, are near); the stalled keepalives arrive right after.
    result = keeper.tick(4.5)
    assert result.stall_s == pytest.approx(2.5)
    assert result.due == []
    keeper.keepalive(1, 4.55)
    # Lease 2 was never renewed: it expires one TTL past its old deadline at most (5.0 + min(2.5, 3)).
    got = first_due(keeper, 4.5, 12.0)
    assert got == {1: pytest.approx(7.6, abs=STEP), 2: pytest.approx(7.5, abs=STEP)}


def test_stall_longer_than_twice_the_ttl_still_expires() -> None:
    keeper = leader({1: 2000})
    assert ticks(keeper, 0.0, 0.5) == []
    result = keeper.tick(10.0)
    assert result.stall_s == pytest.approx(9.5)
    assert result.due == [1]


def test_no_stall_means_no_compensation() -> None:
    keeper = leader({1: 2000})
    assert [keeper.tick(round(0.1 * i, 6)).stall_s for i in range(1, 30)] == [0.0] * 29


# -- mass-expiry guard --------------------------------------------------------------------


def test_mass_expiry_defers_once_and_only_once() -> None:
    guard = StallGuard(mass_count_min=10, mass_share=0.5, mass_defer_s_max=30.0)
    keeper = leader({i: 2000 for i in range(1, 13)} | {100: 60_000}, guard=guard)
    assert ticks(keeper, 0.0, 1.9) == []
    first = keeper.tick(2.0)
    assert first.due == []
    assert first.deferred == 12
    # Deferred by their TTL (2 s), not more; one renews meanwhile and is spared.
    assert ticks(keeper, 2.0, 2.5) == []
    assert keeper.keepalive(5, 2.5) == 2000
    assert keeper.remaining_ms(6, 2.5) == 1500
    second = ticks(keeper, 2.5, 6.0)
    assert second == [(4.0, [i for i in range(1, 13) if i != 5]), (4.5, [5])]


def test_mass_expiry_deferral_is_capped() -> None:
    guard = StallGuard(mass_count_min=3, mass_share=0.5, mass_defer_s_max=1.5)
    keeper = leader({1: 10_000, 2: 10_000, 3: 10_000}, guard=guard)
    assert ticks(keeper, 0.0, 9.9) == []
    assert keeper.tick(10.0).deferred == 3
    assert keeper.remaining_ms(1, 10.0) == 1500
    assert ticks(keeper, 10.0, 12.0) == [(11.5, [1, 2, 3])]


def test_renewed_after_deferral_gets_a_new_deferral_next_time() -> None:
    guard = StallGuard(mass_count_min=2, mass_share=0.5)
    keeper = leader({1: 1000, 2: 1000}, guard=guard)
    assert ticks(keeper, 0.0, 1.0) == []  # deferred
    keeper.keepalive(1, 1.5)
    keeper.keepalive(2, 1.5)
    # Renewed: no longer "deferred once", so the guard may defer them again.
    assert ticks(keeper, 1.5, 2.5) == []
    assert ticks(keeper, 2.5, 3.5) == [(3.5, [1, 2])]


@pytest.mark.parametrize(
    ("n_due", "n_total", "mass_count_min", "expect_deferred"),
    [
        (9, 9, 10, False),  # below mass_count_min: never a mass expiry
        (10, 10, 10, True),
        (10, 20, 10, False),  # exactly half is not "more than half"
        (11, 20, 10, True),
        (1, 1, 1, True),
        (3, 100, 2, False),  # a small share
    ],
)
def test_mass_expiry_thresholds(n_due: int, n_total: int, mass_count_min: int, expect_deferred: bool) -> None:
    guard = StallGuard(mass_count_min=mass_count_min, mass_share=0.5)
    ttls = {i: 1000 if i <= n_due else 60_000 for i in range(1, n_total + 1)}
    keeper = leader(ttls, guard=guard)
    assert ticks(keeper, 0.0, 0.9) == []
    result = keeper.tick(1.0)
    due_ids = list(range(1, n_due + 1))
    if expect_deferred:
        assert (result.due, result.deferred) == ([], n_due)
        assert ticks(keeper, 1.0, 2.0) == [(2.0, due_ids)]
    else:
        assert (result.due, result.deferred) == (due_ids, 0)


def test_stall_then_mass_expiry_hides_a_real_failure_for_one_ttl_at_most() -> None:
    keeper = leader({i: 1000 for i in range(1, 21)})
    assert ticks(keeper, 0.0, 0.2) == []
    # Paused 10 s: compensation (capped at TTL) is not enough, the mass guard defers once.
    result = keeper.tick(10.2)
    assert (result.due, result.deferred) == ([], 20)
    assert ticks(keeper, 10.2, 12.0) == [(11.2, list(range(1, 21)))]


# -- many at once, a borrowed TTL table, the scan bound ---------------------------------------------


def test_keepalive_many_renews_each_and_gives_zero_for_the_missing() -> None:
    keeper = leader({1: 1000, 2: 3000, 3: 1000})
    assert ticks(keeper, 0.0, 1.0) == [(1.0, [1, 3])]  # 1 and 3 are being expired
    keeper.removed(3)
    assert keeper.keepalive_many([2, 1, 3, 99, 2], 1.5) == [3000, 0, 0, 0, 3000]
    assert keeper.remaining_ms(2, 1.5) == 3000
    assert keeper.keepalive_many([], 1.5) == []


def test_keeper_reads_ttls_from_a_table_it_does_not_own() -> None:
    table = {1: 1000, 2: 2000}
    keeper = LeaseKeeper(ttls=table)
    keeper.granted(3, 5000, 0.0)  # the owner of the table records grants, not the keeper
    assert 3 not in table and len(keeper) == 2
    keeper.reset_all(dict(table), 0.0)
    assert keeper.keepalive(2, 0.5) == 2000
    table[2] = 4000  # the keeper copies nothing: it sees the table as it is now
    assert keeper.keepalive(2, 0.5) == 4000
    del table[1]  # gone from the table before its removal reached the keeper: already not renewable
    with pytest.raises(NotFound):
        keeper.keepalive(1, 0.6)
    keeper.removed(1)
    assert len(keeper) == 1


def test_a_keepalive_that_moves_a_deadline_earlier_is_honoured() -> None:
    keeper = LeaseKeeper()
    keeper.granted(1, 1000, 0.0)
    keeper.reset_all({1: 1000}, 0.0, grace_s=5.0)  # due at 6.0 ...
    keeper.keepalive(1, 0.5)  # ... until this renewal makes it 1.5
    assert first_due(keeper, 0.5, 8.0) == {1: pytest.approx(1.5, abs=STEP)}


class _CountingDict(dict[int, float]):
    scans = 0

    def items(self):  # type: ignore[no-untyped-def,override]
        type(self).scans += 1
        return super().items()


def test_tick_scans_only_once_the_earliest_deadline_has_passed() -> None:
    keeper = leader({1: 10_000, 2: 20_000})
    keeper._deadline = _CountingDict(keeper._deadline)
    _CountingDict.scans = 0
    assert ticks(keeper, 0.0, 9.9) == []
    assert _CountingDict.scans == 0, "ticked 99 times before anything could be due, and scanned"
    assert keeper.keepalive(1, 9.95) == 10_000  # moves lease 1 later: the next scan finds nothing
    assert ticks(keeper, 9.9, 19.9) == []
    assert _CountingDict.scans == 1  # at 10.0 (the old bound); then the bound is 19.95
    assert ticks(keeper, 19.9, 20.0) == [(20.0, [1, 2])]  # 1 due at 19.95, 2 at 20.0: both in this tick
    assert _CountingDict.scans == 2
