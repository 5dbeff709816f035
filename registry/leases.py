"""Leader-local lease deadlines: keepalives cost memory, not Raft writes.

Theory of operation
-------------------
A lease's existence and TTL are replicated (``lease_grant`` / ``lease_revoke``
/ ``lease_expire`` commands); its *deadline* is not.  Only the leader keeps
deadlines, in this ``LeaseKeeper``, and a keepalive just moves one deadline
forward in memory, so 100k instances renewing every few seconds cost the
Raft log nothing.

When a node becomes leader it restarts every lease's countdown from its full
TTL (``reset_all``), plus the time a deposed leader may still have answered
keepalives: the new leader cannot know when the old one last acknowledged
one, and a lease must never expire because leadership moved.

The leader asks ``due(now)`` every tick and proposes ``lease_expire`` with
its leadership epoch (its Raft term) for what comes back; the state machine
drops an expiry from an older epoch, so a deposed leader can never expire
anything once a newer leader has announced itself.

Stall guard.  If the ticks stop for a while (the process was paused, the
machine swapped, a long GC), keepalives that clients sent during the stall
are still unread in socket buffers, and a naive keeper would expire every
lease at once on waking.  So a tick that comes more than ``stall_s`` after
the previous one pushes every deadline forward by the stall, at most by the
lease's own TTL, and it is counted and logged.  And when more than
``mass_share`` of the leases (at least ``mass_count_min``) fall due in one
tick, each of them is deferred once, by its TTL at most
``mass_defer_s_max``, to give clients a chance to renew; a lease that is
still due after its one deferral expires, so a real mass failure is hidden
for one TTL at the longest.

Pure: the caller passes ``now`` (monotonic seconds); no clock, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import NotFound

__all__ = ["LeaseKeeper", "StallGuard", "TickResult"]


@dataclass(frozen=True, slots=True)
class StallGuard:
    #: A gap between ticks longer than this counts as a stall (ticks are ~0.1 s).
    stall_s: float = 1.0
    #: Share of live leases due in one tick that counts as a mass expiry.
    mass_share: float = 0.5
    #: Below this many due leases, never call it a mass expiry.
    mass_count_min: int = 10
    #: Longest one-time deferral of a lease in a mass expiry, in seconds.
    mass_defer_s_max: float = 30.0


@dataclass(slots=True)
class TickResult:
    due: list[int] = field(default_factory=list)
    deferred: int = 0
    stall_s: float = 0.0


class LeaseKeeper:
    def __init__(self, guard: StallGuard | None = None) -> None:
        self.guard = guard or StallGuard()
        self._ttl_s: dict[int, float] = {}
        self._deadline: dict[int, float] = {}
        #: Leases deferred once by the mass-expiry guard and not renewed since.
        self._deferred: set[int] = set()
        #: Leases proposed for expiry and not yet gone: do not propose twice.
        self._expiring: dict[int, float] = {}
        self._last_tick: float | None = None
        self.active = False

    def __len__(self) -> int:
        return len(self._ttl_s)

    # -- what the replicated state says exists --------------------------------

    def reset_all(self, ttls_ms: dict[int, int], now: float, grace_s: float = 0.0) -> None:
        """Become leader: every lease gets its full TTL from now, plus ``grace_s``.

        The grace covers keepalives the previous leader may still have
        acknowledged after this node was elected: a cut-off leader stays in
        office (and answers keepalives) for up to its fallback timeout, so the
        new leader adds that timeout to every countdown (etcd's lessor extends
        leases by the election timeout on promotion for the same reason).
        """
        self._ttl_s = {lease: ttl / 1000.0 for lease, ttl in ttls_ms.items()}
        self._deadline = {lease: now + grace_s + ttl for lease, ttl in self._ttl_s.items()}
        self._deferred.clear()
        self._expiring.clear()
        self._last_tick = now
        self.active = True

    def deactivate(self) -> None:
        """Lost leadership: forget deadlines; the next leader restarts them."""
        self.active = False
        self._deadline.clear()
        self._deferred.clear()
        self._expiring.clear()
        self._last_tick = None

    def granted(self, lease: int, ttl_ms: int, now: float) -> None:
        self._ttl_s[lease] = ttl_ms / 1000.0
        if self.active:
            self._deadline[lease] = now + ttl_ms / 1000.0

    def removed(self, lease: int) -> None:
        self._ttl_s.pop(lease, None)
        self._deadline.pop(lease, None)
        self._deferred.discard(lease)
        self._expiring.pop(lease, None)

    # -- keepalive and time-to-live ------------------------------------------

    def keepalive(self, lease: int, now: float) -> int:
        """Renew ``lease``; return its TTL in ms. NotFound if it does not exist (or is expiring)."""
        ttl = self._ttl_s.get(lease)
        if ttl is None or lease in self._expiring:
            raise NotFound(f"lease {lease} not found (expired or revoked)")
        self._deadline[lease] = now + ttl
        self._deferred.discard(lease)
        return int(ttl * 1000)

    def remaining_ms(self, lease: int, now: float) -> int:
        deadline = self._deadline.get(lease)
        if deadline is None or lease in self._expiring:
            raise NotFound(f"lease {lease} not found (expired or revoked)")
        return max(0, int((deadline - now) * 1000))

    # -- the leader's tick -----------------------------------------------------

    def tick(self, now: float, *, expiring_retry_s: float = 5.0) -> TickResult:
        """Return the leases to propose for expiry now, applying the stall guard."""
        result = TickResult()
        guard = self.guard
        if self._last_tick is not None:
            gap = now - self._last_tick
            if gap > guard.stall_s:
                result.stall_s = gap
                for lease, deadline in self._deadline.items():
                    self._deadline[lease] = deadline + min(gap, self._ttl_s.get(lease, 0.0))
        self._last_tick = now
        # An expiry proposal that never committed (leader change) is retried.
        for lease, since in list(self._expiring.items()):
            if now - since > expiring_retry_s:
                del self._expiring[lease]
        due = [lease for lease, deadline in self._deadline.items() if deadline <= now and lease not in self._expiring]
        if not due:
            return result
        fresh = [lease for lease in due if lease not in self._deferred]
        live = len(self._deadline)
        if len(fresh) >= guard.mass_count_min and len(fresh) > guard.mass_share * live:
            for lease in fresh:
                self._deadline[lease] = now + min(self._ttl_s.get(lease, 0.0), guard.mass_defer_s_max)
                self._deferred.add(lease)
            result.deferred = len(fresh)
            due = [lease for lease in due if lease not in set(fresh)]
        for lease in due:
            self._expiring[lease] = now
        result.due = sorted(due)
        return result
