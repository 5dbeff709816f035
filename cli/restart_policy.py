"""When ``regctl up`` restarts a node that died, and when it gives up on it.

Pure: the supervisor (``cli/supervisor.py``) hands in the times of a node's
deaths and the current time (monotonic seconds) and gets a decision back.

A node is restarted after a backoff that doubles with each recent death
(1 s, 2 s, 4 s, ... capped), so a node that crashes on start does not spin.
Deaths older than the window are forgotten: a node that ran fine for a
minute starts again from the first backoff.  A node that died more than
``deaths_per_window_max`` times within the window stays down; ``regctl
status`` reports it, and the user restarts ``regctl up`` after looking at its
log.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Decision", "RestartPolicy", "decide"]


@dataclass(frozen=True)
class RestartPolicy:
    #: The first restart's delay: long enough for the port and the Raft peers to notice the death.
    backoff_first_s: float = 1.0
    #: No restart waits longer than this.
    backoff_max_s: float = 30.0
    #: More deaths than this within ``window_s`` and the node stays down (0: never restart).
    deaths_per_window_max: int = 5
    #: The window deaths are counted in.
    window_s: float = 60.0

    def validate(self) -> None:
        if not 0 < self.backoff_first_s <= self.backoff_max_s:
            raise ValueError("backoff_first_s must be > 0 and <= backoff_max_s")
        if self.deaths_per_window_max < 0:
            raise ValueError("deaths_per_window_max must be >= 0 (0: never restart)")
        if self.window_s <= 0:
            raise ValueError("window_s must be > 0")


@dataclass(frozen=True)
class Decision:
    #: False: leave the node down for good.
    restart: bool
    #: Seconds to wait before the restart (0 when not restarting).
    delay_s: float
    #: The deaths still inside the window, this one included (what the caller keeps).
    recent: tuple[float, ...]


def decide(policy: RestartPolicy, deaths: Sequence[float], now: float) -> Decision:
    """What to do about a node whose deaths (this one included, the last) happened at ``deaths``."""
    recent = tuple(t for t in deaths if now - t < policy.window_s)
    if len(recent) > policy.deaths_per_window_max:
        return Decision(False, 0.0, recent)
    # Doubling, capped; the exponent is bounded by deaths_per_window_max, so this never overflows.
    delay = min(policy.backoff_max_s, policy.backoff_first_s * 2 ** (max(len(recent), 1) - 1))
    return Decision(True, delay, recent)
