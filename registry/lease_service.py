"""The I/O shell around ``LeaseKeeper``: leadership changes, the expiry tick, keepalive ops.

Runs on the node's event loop.  Every 100 ms it checks whether this node
leads: on gaining leadership it restarts all countdowns and commits a
``leader_epoch`` command (so expiries proposed by any older leader are
dropped by the state machine); on losing it, it forgets its deadlines.
While leading, it proposes ``lease_expire`` for due leases, stamped with
its term as the epoch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from .errors import BadRequest, NotLeader, RegistryError
from .leases import LeaseKeeper, StallGuard
from .metrics import NodeMetrics
from .proposer import Proposer
from .replication import RaftNode, StateHolder

__all__ = ["LeaseService"]

log = logging.getLogger("registry.leases")

#: Expiry tick; lease deadlines are honoured to within this.
TICK_S = 0.1
#: Leases expired in one command, so one huge expiry cannot exceed a frame/entry.
EXPIRE_BATCH_MAX = 1000
#: Pause between attempts to commit a new leader's epoch.
ANNOUNCE_RETRY_S = 0.2


class LeaseService:
    def __init__(self, raft: RaftNode, holder: StateHolder, proposer: Proposer, metrics: NodeMetrics,
                 leader_api: Any, guard: StallGuard | None = None, handover_grace_s: float = 0.0) -> None:
        self._raft = raft
        #: Added to every countdown when this node becomes leader: the longest a
        #: cut-off previous leader may have kept acknowledging keepalives.
        self._handover_grace_s = handover_grace_s
        self._holder = holder
        self._proposer = proposer
        self._metrics = metrics
        self._leader_api = leader_api  # () -> str | None: the leader's API address, for hints
        self.keeper = LeaseKeeper(guard)
        self._term = -1
        self._task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        with holder.lock:
            for lease, ttl in holder.state.lease_ttls().items():
                self.keeper.granted(lease, ttl, time.monotonic())

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for task in list(self._background):
            task.cancel()

    def on_events(self, events: list[dict[str, Any]]) -> None:
        """Mirror lease grants and removals from applied events (every node)."""
        if not self.keeper.active and any(e.get("kind") == "lease" for e in events) and self._raft._isLeader():
            # This node leads but its tick has not noticed yet: take over the
            # countdowns now, so a lease granted in this term (one of these
            # events) gets its plain TTL rather than the hand-over grace.
            self._tick()
        now = time.monotonic()
        for event in events:
            if event.get("kind") != "lease":
                continue
            lease = int(event["id"])
            if event["type"] == "put" and event.get("after"):
                self.keeper.granted(lease, int(event["after"]["ttl_ms"]), now)
            elif event["type"] in ("delete", "expire"):
                self.keeper.removed(lease)
                if event["type"] == "expire":
                    self._metrics.lease_expiries.inc()
        self._metrics.leases.set(len(self.keeper))

    def on_restore(self) -> None:
        """The state was replaced by a snapshot: rebuild from it."""
        with self._holder.lock:
            ttls = self._holder.state.lease_ttls()
        self.keeper.reset_all(ttls, time.monotonic())
        if not self._raft._isLeader():
            self.keeper.deactivate()
            for lease, ttl in ttls.items():
                self.keeper.granted(lease, ttl, time.monotonic())

    # -- ops ----------------------------------------------------------------------

    def _leading(self) -> bool:
        """Still the leader of the term whose countdowns the keeper holds (the tick may lag by 100 ms)."""
        return (self.keeper.active and bool(self._raft._isLeader())
                and int(self._raft.raftCurrentTerm) == self._term)

    def _require_leader(self) -> None:
        if not self._leading():
            raise NotLeader("lease keepalives are served by the leader", hint=self._leader_api())

    async def keepalive(self, args: dict[str, Any]) -> tuple[int, Any]:
        lease = _lease_arg(args)
        self._require_leader()
        ttl_ms = self.keeper.keepalive(lease, time.monotonic())
        self._metrics.keepalives.inc()
        return self._holder.state.revision, {"lease": lease, "ttl_ms": ttl_ms}

    async def time_to_live(self, args: dict[str, Any]) -> tuple[int, Any]:
        lease = _lease_arg(args)
        self._require_leader()
        remaining = self.keeper.remaining_ms(lease, time.monotonic())
        with self._holder.lock:
            state = self._holder.state
            info = state.get_lease(lease)
            return state.revision, {**info, "remaining_ms": remaining}

    # -- the tick -----------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                self._tick()
            except Exception:
                log.exception("lease tick failed")
            await asyncio.sleep(TICK_S)

    def _tick(self) -> None:
        now = time.monotonic()
        leading = bool(self._raft._isLeader())
        term = int(self._raft.raftCurrentTerm)
        if leading and (not self.keeper.active or term != self._term):
            with self._holder.lock:
                ttls = self._holder.state.lease_ttls()
            self.keeper.reset_all(ttls, now, self._handover_grace_s)
            self._term = term
            log.info("leading in term %d: restarted the countdown of %d lease(s)", term, len(ttls))
            self._spawn(self._announce_epoch(term))
            return
        if not leading:
            if self.keeper.active:
                log.info("no longer leader: lease deadlines handed over")
                self.keeper.deactivate()
            return
        result = self.keeper.tick(now)
        if result.stall_s:
            log.warning("lease tick stalled for %.2fs: pushed deadlines forward by the stall", result.stall_s)
        if result.deferred:
            self._metrics.lease_expiries_deferred.inc(result.deferred)
            log.warning("mass expiry guard: deferred %d lease(s) once; they expire next time unless renewed",
                        result.deferred)
        for i in range(0, len(result.due), EXPIRE_BATCH_MAX):
            chunk = result.due[i : i + EXPIRE_BATCH_MAX]
            self._spawn(self._expire(chunk, term))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _announce_epoch(self, term: int) -> None:
        # Until this commits, the state machine cannot tell this leader's expiries
        # from a deposed one's: keep trying for as long as this term lasts.
        while self._term == term and self.keeper.active:
            try:
                await self._proposer.write({"op": "leader_epoch", "epoch": term})
                return
            except RegistryError as err:
                log.warning("could not commit leader epoch %d (retrying): %s", term, err.message)
            await asyncio.sleep(ANNOUNCE_RETRY_S)

    async def _expire(self, leases: list[int], term: int) -> None:
        # A leader deposed while stalled still believes it leads when it wakes,
        # and its deadlines are stale.  pysyncobj forwards a follower's proposal
        # to the new leader, so once submitted, only the epoch check would stop
        # this expiry -- and that check is blind until the successor's
        # leader_epoch commits.  So first confirm leadership: a barrier commits
        # only once this node has caught up with any newer term.
        try:
            await self._proposer.barrier()
        except RegistryError as err:
            log.warning("lease expiry of %d lease(s) postponed: leadership unconfirmed: %s", len(leases), err.message)
            return
        if not self._leading() or self._term != term:
            log.warning("lease expiry of %d lease(s) abandoned: no longer leader of term %d", len(leases), term)
            return
        try:
            result = await self._proposer.write({"op": "lease_expire", "leases": leases, "epoch": term})
        except RegistryError as err:
            log.warning("lease expiry of %d lease(s) not committed: %s", len(leases), err.message)
            return
        if result.get("dropped"):
            log.warning("expiry from epoch %d dropped: a newer leader exists", term)
        elif result.get("expired"):
            log.info("expired lease(s) %s at revision %d", result["expired"][:20], result["revision"])


def _lease_arg(args: dict[str, Any]) -> int:
    unknown = set(args) - {"lease"}
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(sorted(unknown))}")
    lease = args.get("lease")
    if not isinstance(lease, int) or isinstance(lease, bool):
        raise BadRequest("field 'lease' must be an integer")
    return lease
