"""bench.timeline lines each write's stages up across the nodes (the pure part of the timeline bench)."""

from __future__ import annotations

import pytest

from bench.timeline import CHAIN, Stages, line_up, summarize


def records(stages: list[tuple[int, str]]) -> Stages:
    return Stages([(t, "x", stage) for t, stage in stages])


LEADER = [(105, "read"), (110, "seal"), (112, "submit"), (120, "wait<"), (121, "tick"), (125, "append"),
          (130, "send:append_entries"), (131, "fdatasync>"), (135, "sent"), (200, "fdatasync<"),
          (390, "sockread"), (400, "recv:next_node_idx"), (410, "apply>"), (420, "apply<"), (430, "complete"),
          (432, "answer"), (440, "flush")]
FAST = [(140, "sockread"), (142, "open>"), (148, "open<"), (150, "recv:append_entries"), (155, "append"),
        (160, "fdatasync>"), (300, "fdatasync<"), (305, "send:next_node_idx"), (310, "sent")]
SLOW = [(140, "sockread"), (142, "open>"), (148, "open<"), (150, "recv:append_entries"), (155, "append"),
        (160, "fdatasync>"), (500, "fdatasync<"), (505, "send:next_node_idx"), (510, "sent")]


def test_a_write_lines_up_with_the_follower_that_answered_first() -> None:
    line = line_up(100, 500, records(LEADER), [records(SLOW), records(FAST)])
    assert line is not None
    assert line["follower's fdatasync ends"] == 200  # FAST's, not SLOW's (which is past the window anyway)
    assert line["leader receives the reply"] == 300
    assert line["client receives"] == 400
    assert [name for name, *_ in CHAIN] == [k for k in line if k not in ("client sends", "client receives")]


@pytest.mark.parametrize(
    ("drop", "why"),
    [
        ("send:append_entries", "the leader never sent the entry"),
        ("recv:next_node_idx", "no reply reached the leader"),
        ("flush", "the answer was never written"),
    ],
)
def test_a_write_with_a_missing_stage_is_not_lined_up(drop: str, why: str) -> None:
    leader = records([r for r in LEADER if r[1] != drop])
    assert line_up(100, 500, leader, [records(FAST)]) is None, why


def test_stages_of_the_next_write_do_not_count() -> None:
    # The reply arrives after the client already has its answer: it belongs to a later write.
    late = [(t if stage != "recv:next_node_idx" else 600, stage) for t, stage in LEADER]
    assert line_up(100, 500, records(late), [records(FAST)]) is None


def test_summary_takes_medians_of_offsets_and_steps() -> None:
    shifted = [(t + 1000, s) for t, s in LEADER]
    fast_shifted = [(t + 1000, s) for t, s in FAST]
    leader = records(LEADER + shifted)
    follower = records(FAST + fast_shifted)
    summary = summarize([(100, 500), (1100, 1500)], leader, [follower])
    assert summary.lined_up == 2
    assert summary.stages["leader's fdatasync ends"] == (100, 69)
    assert summary.stages["client receives"] == (400, 60)


def test_without_fsync_the_fdatasync_stages_are_left_out() -> None:
    leader = records([r for r in LEADER if not r[1].startswith("fdatasync")])
    follower = records([r for r in FAST if not r[1].startswith("fdatasync")])
    line = line_up(100, 500, leader, [follower])
    assert line is not None
    assert "follower's fdatasync ends" not in line and "leader's fdatasync starts" not in line
    summary = summarize([(100, 500)], leader, [follower])
    # The reply's step counts from the last stage found before it: the follower's append.
    assert summary.stages["follower sends its reply"] == (205, 150)
