"""Raft message plumbing: the leader's choice to send a round now or hold back a commit-only one, and framing."""

from __future__ import annotations

import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from registry.config import RaftTiming
from registry.errors import InvalidArgument
from registry.raft.commit_hold import CommitHold, commit_round_action
from registry.raft.transport import zlib_stored

D = 0.002  # delay_s

# (wanted, due, now, delay_s, only_commit_index) -> (send now, new due)
CASES = [
    # Nothing asked, nothing held: nothing happens.
    ((False, None, 10.0, D, False), (False, None)),
    # A round with entries (or a heartbeat) goes at once and ends any hold.
    ((True, None, 10.0, D, False), (True, None)),
    ((True, 10.001, 10.0, D, False), (True, None)),
    # A commit-only round is held until now + delay ...
    ((True, None, 10.0, D, True), (False, 10.0 + D)),
    # ... keeps its first deadline when more commits ask again ...
    ((True, 10.001, 10.0005, D, True), (False, 10.001)),
    # ... and goes once the deadline has passed, asked again or not.
    ((True, 10.001, 10.001, D, True), (True, None)),
    ((False, 10.001, 10.0009, D, False), (False, 10.001)),
    ((False, 10.001, 10.0011, D, False), (True, None)),
    # Delay 0: never held.
    ((True, None, 10.0, 0.0, True), (True, None)),
]


@pytest.mark.parametrize(("args", "expected"), CASES)
def test_commit_round_action(args: tuple[bool, float | None, float, float, bool],
                             expected: tuple[bool, float | None]) -> None:
    wanted, due, now, delay_s, only = args
    send, new_due = commit_round_action(wanted=wanted, due=due, now=now, delay_s=delay_s, only_commit_index=only)
    assert send == expected[0]
    if expected[1] is None:
        assert new_due is None
    else:
        assert new_due == pytest.approx(expected[1])


# Steps of (now, wanted, only_commit_index) -> (send now, held round's deadline afterwards).
SERIAL_WRITES = [  # a client writing in a loop: each entry follows its commit within the delay
    ((0.0, True, True), (False, 0.002)),      # commit: held
    ((0.0003, True, False), (True, None)),    # the next entry carries it
    ((0.0010, True, True), (False, 0.003)),   # held again
    ((0.0012, True, False), (True, None)),
]
PACED_WRITES = [  # a write every 9 ms: the first hold expires, then commits go at once
    ((0.0, True, True), (False, 0.002)),
    ((0.002, False, False), (True, None)),    # the poller woke at the deadline: sent alone
    ((0.009, True, False), (True, None)),     # the entry came 9 ms after the commit: stop holding
    ((0.010, True, True), (True, None)),      # commit: sent at once
    ((0.019, True, False), (True, None)),
    ((0.020, True, True), (True, None)),
    # A burst of quick writes turns holding back on.
    ((0.0203, True, False), (True, None)),
    ((0.021, True, True), (False, 0.023)),
]


@pytest.mark.parametrize("steps", [SERIAL_WRITES, PACED_WRITES], ids=["serial", "paced"])
def test_commit_hold_holds_only_while_entries_follow_quickly(
        steps: list[tuple[tuple[float, bool, bool], tuple[bool, float | None]]]) -> None:
    hold = CommitHold(D)
    for (now, wanted, only), (send, due) in steps:
        assert hold.decide(now, wanted, only) == send, (now, wanted, only)
        if due is None:
            assert hold.due is None, now
        else:
            assert hold.due == pytest.approx(due), now


def test_commit_hold_reset_forgets_the_held_round_and_the_history() -> None:
    hold = CommitHold(D)
    assert not hold.decide(0.0, True, True)
    hold.reset()
    assert hold.due is None
    assert not hold.decide(5.0, True, True)  # holding again, as on a fresh leader
    assert CommitHold(0.0).decide(0.0, True, True)  # delay 0: never held


@pytest.mark.parametrize("delay_s", [-0.001, 0.05, 0.2])
def test_commit_notify_delay_must_be_under_the_heartbeat(delay_s: float) -> None:
    with pytest.raises(InvalidArgument, match="commit_notify_delay_s"):
        RaftTiming(commit_notify_delay_s=delay_s).validate()


@pytest.mark.parametrize("delay_s", [0.0, 0.002, 0.049])
def test_commit_notify_delays_under_the_heartbeat_are_accepted(delay_s: float) -> None:
    RaftTiming(commit_notify_delay_s=delay_s).validate()


# -- Raft messages as stored zlib streams ----------------------------------------------

@pytest.mark.parametrize("size", [0, 1, 500, 0xFFFF - 1, 0xFFFF, 0xFFFF + 1, 3 * 0xFFFF, 200_000])
def test_zlib_stored_round_trips_at_block_boundaries(size: int) -> None:
    data = bytes(i % 251 for i in range(size))
    stream = zlib_stored(data)
    assert zlib.decompress(stream) == data
    blocks = max(1, -(-size // 0xFFFF))
    assert len(stream) == 2 + 5 * blocks + size + 4  # header, block heads, payload, adler32: nothing compressed


@given(st.binary(max_size=150_000))
@settings(max_examples=60, deadline=None)
def test_zlib_stored_is_read_back_by_zlib(data: bytes) -> None:
    assert zlib.decompress(zlib_stored(data)) == data
    assert zlib.decompressobj().decompress(zlib_stored(data)) == data
