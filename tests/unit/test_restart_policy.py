"""``regctl up``'s restart decisions: backoff doubling, its cap, the window, giving up."""

from __future__ import annotations

import pytest

from cli.restart_policy import RestartPolicy, decide

POLICY = RestartPolicy(backoff_first_s=1.0, backoff_max_s=8.0, deaths_per_window_max=5, window_s=60.0)


@pytest.mark.parametrize(
    ("deaths", "now", "restart", "delay_s", "recent"),
    [
        # The first death: the first backoff.
        ((100.0,), 100.0, True, 1.0, 1),
        # Doubling with each recent death.
        ((100.0, 102.0), 102.0, True, 2.0, 2),
        ((100.0, 102.0, 105.0), 105.0, True, 4.0, 3),
        ((100.0, 102.0, 105.0, 110.0), 110.0, True, 8.0, 4),
        # Capped at backoff_max_s.
        ((100.0, 102.0, 105.0, 110.0, 119.0), 119.0, True, 8.0, 5),
        # One more than deaths_per_window_max within the window: stays down.
        ((100.0, 102.0, 105.0, 110.0, 119.0, 128.0), 128.0, False, 0.0, 6),
        # Deaths older than the window are forgotten: back to the first backoff.
        ((10.0, 20.0, 30.0, 40.0, 50.0, 200.0), 200.0, True, 1.0, 1),
        # Exactly window_s ago is outside the window.
        ((140.1, 200.0), 200.0, True, 2.0, 2),
        ((140.0, 200.0), 200.0, True, 1.0, 1),
    ],
)
def test_decide(deaths: tuple[float, ...], now: float, restart: bool, delay_s: float, recent: int) -> None:
    decision = decide(POLICY, deaths, now)
    assert (decision.restart, decision.delay_s, len(decision.recent)) == (restart, delay_s, recent)


def test_zero_deaths_allowed_never_restarts() -> None:
    assert decide(RestartPolicy(deaths_per_window_max=0), (5.0,), 5.0).restart is False


def test_defaults_are_valid_and_start_at_one_second() -> None:
    policy = RestartPolicy()
    policy.validate()
    assert [decide(policy, tuple(float(t) for t in range(n)), float(n - 1)).delay_s for n in (1, 2, 3, 4)] == [
        1.0, 2.0, 4.0, 8.0]


@pytest.mark.parametrize(
    "policy",
    [
        RestartPolicy(backoff_first_s=0.0),
        RestartPolicy(backoff_first_s=10.0, backoff_max_s=5.0),
        RestartPolicy(deaths_per_window_max=-1),
        RestartPolicy(window_s=0.0),
    ],
)
def test_validate_refuses(policy: RestartPolicy) -> None:
    with pytest.raises(ValueError):
        policy.validate()
