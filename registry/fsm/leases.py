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

Memory and CPU (the leader holds every lease: 100k leases x N bytes).  The
keeper's only per-lease structure is one dict ``lease id -> deadline`` (a
float; about 75 B per lease).  TTLs are not copied: they are read from a
``TtlTable`` -- on a node, a view of the replicated state, which holds them
anyway; in tests, a plain dict.  A lease that is being expired keeps its
entry with an infinite deadline instead of living in a second table.  The
tick does not scan the table every 100 ms: it keeps ``_earliest``, a lower
bound on every finite deadline, and scans only once that has passed (then
recomputes it).  Keepalives move deadlines later almost always, so with
healthy clients a scan happens about once per TTL, not ten times a second;
a keepalive that moves a deadline earlier (after a hand-over grace or a
stall push) lowers the bound itself.

Pure: the caller passes ``now`` (monotonic seconds); no clock, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from registry.errors import NotFound

__all__ = ["LeaseKeeper", "StallGuard", "TickResult", "TtlTable"]

_INF = float("inf")


class TtlTable(Protocol):
    """Where the keeper reads TTLs (ms) and the live lease count from."""

    def get(self, lease: int, /) -> int | None: ...

    def __len__(self) -> int: ...


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
    __slots__ = ("_deadline", "_deferred", "_earliest", "_expiring", "_last_tick", "_own_ttls", "_ttls",
                 "active", "guard")

    def __init__(self, guard: StallGuard | None = None, ttls: TtlTable | None = None) -> None:
        """``ttls``: the replicated TTL table to read; None = keep a private copy (``granted``/``removed``)."""
        self.guard = guard or StallGuard()
        #: Our own copy of the TTLs (ms) when nobody gave us a table to read.
        self._own_ttls: dict[int, int] | None = {} if ttls is None else None
        self._ttls: TtlTable = ttls if ttls is not None else self._own_ttls  # type: ignore[assignment]
        #: lease -> deadline (monotonic s) while leading; +inf while its expiry is in flight.
        self._deadline: dict[int, float] = {}
        #: A lower bound on every finite deadline: no tick scans before it.
        self._earliest = _INF
        #: Leases deferred once by the mass-expiry guard and not renewed since.
        self._deferred: set[int] = set()
        #: Leases proposed for expiry and not yet gone (-> when): do not propose twice.
        self._expiring: dict[int, float] = {}
        self._last_tick: float | None = None
        self.active = False

    def __len__(self) -> int:
        return len(self._ttls)

    # -- what the replicated state says exists --------------------------------

    def reset_all(self, ttls_ms: dict[int, int], now: float, grace_s: float = 0.0) -> None:
        """Become leader: every lease gets its full TTL from now, plus ``grace_s``.

        The grace covers keepalives the previous leader may still have
        acknowledged after this node was elected: a cut-off leader stays in
        office (and answers keepalives) for up to its fallback timeout, so the
        new leader adds that timeout to every countdown (etcd's lessor extends
        leases by the election timeout on promotion for the same reason).
        """
        if self._own_ttls is not None:
            self._own_ttls.clear()
            self._own_ttls.update(ttls_ms)
        start = now + grace_s
        # Leases share a handful of TTLs: one float per distinct TTL, not one per lease.
        ttl_s = {ttl: ttl / 1000.0 for ttl in set(ttls_ms.values())}
        self._deadline = {lease: start + ttl_s[ttl] for lease, ttl in ttls_ms.items()}
        self._earliest = min(self._deadline.values(), default=_INF)
        self._deferred.clear()
        self._expiring.clear()
        self._last_tick = now
        self.active = True

    def deactivate(self) -> None:
        """Lost leadership: forget deadlines; the next leader restarts them."""
        self.active = False
        self._deadline = {}  # a new dict: a cleared one would keep its 100k-slot table
        self._earliest = _INF
        self._deferred.clear()
        self._expiring.clear()
        self._last_tick = None

    def granted(self, lease: int, ttl_ms: int, now: float) -> None:
        if self._own_ttls is not None:
            self._own_ttls[lease] = ttl_ms
        if self.active:
            deadline = now + ttl_ms / 1000.0
            self._deadline[lease] = deadline
            self._deferred.discard(lease)
            self._expiring.pop(lease, None)
            if deadline < self._earliest:
                self._earliest = deadline

    def removed(self, lease: int) -> None:
        if self._own_ttls is not None:
            self._own_ttls.pop(lease, None)
        self._deadline.pop(lease, None)
        self._deferred.discard(lease)
        self._expiring.pop(lease, None)

    # -- keepalive and time-to-live ------------------------------------------

    def keepalive(self, lease: int, now: float) -> int:
        """Renew ``lease``; return its TTL in ms. NotFound if it does not exist (or is expiring)."""
        ttl = self._renew(lease, now)
        if not ttl:
            raise NotFound(f"lease {lease} not found (expired or revoked)")
        return ttl

    def keepalive_many(self, leases: Iterable[int], now: float) -> list[int]:
        """Renew each lease; return their TTLs in ms, 0 for one that does not exist (or is expiring)."""
        renew = self._renew
        return [renew(lease, now) for lease in leases]

    def _renew(self, lease: int, now: float) -> int:
        # The hot path (one call per lease id in every keepalive frame): two dict
        # lookups and a store.  The deadline of an expiring lease is +inf.
        old = self._deadline.get(lease)
        if old is None or old == _INF:
            return 0
        ttl = self._ttls.get(lease)
        if not ttl:
            return 0  # already gone from the replicated state; the removal event is on its way
        deadline = now + ttl / 1000.0
        self._deadline[lease] = deadline
        if deadline < self._earliest:
            self._earliest = deadline
        if self._deferred:
            self._deferred.discard(lease)
        return ttl

    def remaining_ms(self, lease: int, now: float) -> int:
        deadline = self._deadline.get(lease)
        if deadline is None or deadline == _INF:
            raise NotFound(f"lease {lease} not found (expired or revoked)")
        return max(0, int((deadline - now) * 1000))

    # -- the leader's tick -----------------------------------------------------

    def tick(self, now: float, *, expiring_retry_s: float = 5.0) -> TickResult:
        """Return the leases to propose for expiry now, applying the stall guard."""
        result = TickResult()
        guard = self.guard
        deadlines = self._deadline
        if self._last_tick is not None:
            gap = now - self._last_tick
            if gap > guard.stall_s:
                result.stall_s = gap
                ttls = self._ttls
                for lease, deadline in deadlines.items():
                    deadlines[lease] = deadline + min(gap, (ttls.get(lease) or 0) / 1000.0)
                self._earliest = -_INF  # deadlines changed wholesale: scan now
        self._last_tick = now
        # An expiry proposal that never committed (leader change) is retried:
        # the lease is due again at once (its deadline had passed).
        for lease, since in list(self._expiring.items()):
            if now - since > expiring_retry_s:
                del self._expiring[lease]
                if lease in deadlines:
                    deadlines[lease] = since
                    self._earliest = min(self._earliest, since)
        if now < self._earliest:
            return result  # nothing can be due yet: no scan
        due = [lease for lease, deadline in deadlines.items() if deadline <= now]
        if due:
            fresh = [lease for lease in due if lease not in self._deferred]
            live = len(deadlines)
            if len(fresh) >= guard.mass_count_min and len(fresh) > guard.mass_share * live:
                ttls = self._ttls
                for lease in fresh:
                    deadlines[lease] = now + min((ttls.get(lease) or 0) / 1000.0, guard.mass_defer_s_max)
                    self._deferred.add(lease)
                result.deferred = len(fresh)
                fresh_set = set(fresh)
                due = [lease for lease in due if lease not in fresh_set]
            for lease in due:
                self._expiring[lease] = now
                deadlines[lease] = _INF
            result.due = sorted(due)
        self._earliest = min(deadlines.values(), default=_INF)
        return result
