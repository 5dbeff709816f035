"""The I/O shell around ``LeaseKeeper``: leadership changes, the expiry tick, keepalive ops.

Runs on the node's event loop.  Every 100 ms it checks whether this node
leads: on gaining leadership it restarts all countdowns and commits a
``leader_epoch`` command (so expiries proposed by any older leader are
dropped by the state machine); on losing it, it forgets its deadlines.
While leading, it proposes ``lease_expire`` for due leases, stamped with
its term as the epoch.

Keepalive ops are synchronous (``*_now``): they touch only memory, so the
server may run them inline as a frame is parsed, without a task per request.
``lease_keepalive_batch`` renews many leases with one frame (an agent renews
every lease it holds in one message, like etcd's keepalive stream): the
per-frame costs (parse, leadership check, response, metrics) are paid once
for up to ``model.LEASE_KEEPALIVE_IDS_MAX`` leases.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any

from registry.errors import BadRequest, InvalidArgument, NotLeader, RegistryError
from registry.fsm import model
from registry.fsm.leases import LeaseKeeper, StallGuard
from registry.raft.node import RaftNode, StateHolder
from registry.server.api import CURRENT_AUTH
from registry.server.metrics import NodeMetrics
from registry.server.proposer import Proposer

__all__ = ["LeaseService"]

log = logging.getLogger("registry.fsm.leases")

#: Expiry tick; lease deadlines are honoured to within this.
TICK_S = 0.1
#: Leases expired in one command, so one huge expiry cannot exceed a frame/entry.
EXPIRE_BATCH_MAX = 1000
#: Pause between attempts to commit a new leader's epoch.
ANNOUNCE_RETRY_S = 0.2


class LeaseService:
    def __init__(self, raft: RaftNode, holder: StateHolder, proposer: Proposer, metrics: NodeMetrics,
                 leader_api: Any, guard: StallGuard | None = None, handover_grace_s: float = 0.0,
                 state_bytes_max: int | None = None) -> None:
        self._raft = raft
        #: This node's --max-state-bytes, announced with its leader epoch: the budget every replica
        #: enforces while it leads (None: announce none, the state keeps the one it has).
        self._state_bytes_max = state_bytes_max
        #: Added to every countdown when this node becomes leader: the longest a
        #: cut-off previous leader may have kept acknowledging keepalives.
        self._handover_grace_s = handover_grace_s
        self._holder = holder
        self._proposer = proposer
        self._metrics = metrics
        self._leader_api = leader_api  # () -> str | None: the leader's API address, for hints
        # The keeper reads TTLs from the replicated state instead of copying them.
        self.keeper = LeaseKeeper(guard, _StateTtls(holder))
        self._term = -1
        self._task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        #: Keepalives served since the last tick; added to the Prometheus counter
        #: there, in one inc() (an inc() per keepalive costs more than the keepalive).
        self._keepalives_unflushed = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        self.flush_metrics()
        if self._task is not None:
            self._task.cancel()
        for task in list(self._background):
            task.cancel()

    def on_events(self, events: list[dict[str, Any]]) -> None:
        """Mirror lease grants and removals from applied events (every node)."""
        # Most batches hold no lease event: find that out in C (two Python passes over every
        # event of every batch were 5% of a follower's CPU under register load).
        if "lease" not in set(map(dict.get, events, itertools.repeat("kind"))):
            return
        if not self.keeper.active and self._raft.is_leader():
            # This node leads but its tick has not noticed yet: take over the
            # countdowns now, so a lease granted in this term (one of these
            # events) gets its plain TTL rather than the hand-over grace.
            self._tick()
        now = time.monotonic()
        keeper = self.keeper
        for event in events:
            if event.get("kind") != "lease":
                continue
            if event["type"] == "put" and event.get("after"):
                after = event["after"]
                # The record's int, not int(event["id"]): the keeper's key is then the
                # same object as the state's, not a second 28-byte int per lease.
                keeper.granted(after["lease"], after["ttl_ms"], now)
            elif event["type"] in ("delete", "expire"):
                keeper.removed(int(event["id"]))
                if event["type"] == "expire":
                    self._metrics.lease_expiries.inc()
        self._metrics.leases.set(len(keeper))

    def on_restore(self) -> None:
        """The state was replaced by a snapshot: rebuild from it."""
        if not self._raft.is_leader():
            self.keeper.deactivate()  # followers keep no deadlines; TTLs are read from the new state
        else:
            with self._holder.lock:
                ttls = self._holder.state.lease_ttls()
            self.keeper.reset_all(ttls, time.monotonic())
        self._metrics.leases.set(len(self.keeper))

    # -- ops ----------------------------------------------------------------------

    def _leading(self) -> bool:
        """Still the leader of the term whose countdowns the keeper holds (the tick may lag by 100 ms)."""
        return (self.keeper.active and self._raft.is_leader()
                and self._raft.term() == self._term)

    def _require_leader(self) -> None:
        if not self._leading():
            raise NotLeader("lease keepalives are served by the leader", hint=self._leader_api())

    def _check_owner(self, leases: list[int]) -> None:
        """With ACLs on, only the token that granted a live lease (or admin on lease) may renew it."""
        auth = CURRENT_AUTH.get()
        if not auth:
            return
        with self._holder.lock:
            state = self._holder.state
            for lease in leases:
                if state.lease_ttl_ms(lease) is not None:  # a gone lease is reported as such, not refused
                    state.lease_use_check(auth, lease, "keepalive")

    def keepalive_now(self, args: dict[str, Any]) -> tuple[int, Any]:
        """``lease_keepalive``: renew one lease (NOT_FOUND if it is gone)."""
        lease = _lease_arg(args)
        self._require_leader()
        self._check_owner([lease])
        ttl_ms = self.keeper.keepalive(lease, time.monotonic())
        self._keepalives_unflushed += 1
        return self._holder.state.revision, {"lease": lease, "ttl_ms": ttl_ms}

    def keepalive_batch_now(self, args: dict[str, Any]) -> tuple[int, Any]:
        """``lease_keepalive_batch``: renew many leases; a gone one is reported, not an error.

        One lost lease among an agent's hundred must not make the other 99
        fail, so the frame succeeds and ``missing`` lists the ids that are not
        live (expired, revoked, never granted); ``ttl_ms`` has each id's TTL in
        request order, 0 for a missing one.
        """
        leases = _lease_list_arg(args)
        self._require_leader()
        self._check_owner(leases)
        ttls = self.keeper.keepalive_many(leases, time.monotonic())
        missing = [lease for lease, ttl in zip(leases, ttls, strict=True) if not ttl]
        renewed = len(leases) - len(missing)
        self._keepalives_unflushed += renewed
        return self._holder.state.revision, {"renewed": renewed, "ttl_ms": ttls, "missing": missing}

    async def keepalive(self, args: dict[str, Any]) -> tuple[int, Any]:
        return self.keepalive_now(args)

    async def keepalive_batch(self, args: dict[str, Any]) -> tuple[int, Any]:
        return self.keepalive_batch_now(args)

    async def time_to_live(self, args: dict[str, Any]) -> tuple[int, Any]:
        lease = _lease_arg(args)
        self._require_leader()
        remaining = self.keeper.remaining_ms(lease, time.monotonic())
        with self._holder.lock:
            state = self._holder.state
            info = state.get_lease(lease)
            return state.revision, {**info, "remaining_ms": remaining}

    # -- the tick -----------------------------------------------------------------

    def flush_metrics(self) -> None:
        if self._keepalives_unflushed:
            self._metrics.keepalives.inc(self._keepalives_unflushed)
            self._keepalives_unflushed = 0

    async def _run(self) -> None:
        while True:
            try:
                self.flush_metrics()
                self._tick()
            except Exception:
                log.exception("lease tick failed")
            await asyncio.sleep(TICK_S)

    def _tick(self) -> None:
        now = time.monotonic()
        leading = self._raft.is_leader()
        term = self._raft.term()
        if leading and (not self.keeper.active or term != self._term):
            with self._holder.lock:
                ttls = self._holder.state.lease_ttls()
            self.keeper.reset_all(ttls, now, self._handover_grace_s)
            self._metrics.leases.set(len(self.keeper))
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
                # ungated: the proposer holds every other write until this one has applied.
                await self._proposer.write({"op": "leader_epoch", "epoch": term,
                                            "state_bytes_max": self._state_bytes_max}, ungated=True)
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


def _lease_list_arg(args: dict[str, Any]) -> list[int]:
    unknown = set(args) - {"leases"}
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(sorted(unknown))}")
    leases = args.get("leases")
    if not isinstance(leases, list):
        raise BadRequest("field 'leases' must be a list of integers")
    if not 1 <= len(leases) <= model.LEASE_KEEPALIVE_IDS_MAX:
        raise InvalidArgument(f"field 'leases' must hold 1..{model.LEASE_KEEPALIVE_IDS_MAX} lease ids, "
                              f"not {len(leases)}")
    # ``type() is int`` also refuses bools (an int subclass), at C speed for 10k ids.
    if not all(type(lease) is int for lease in leases):
        raise BadRequest("field 'leases' must be a list of integers")
    return leases


class _StateTtls:
    """The keeper's TTL table: a read-only view of the replicated state, so no per-lease copy.

    Read from the loop without ``holder.lock``: each call is one dict lookup,
    atomic under the GIL, and a lease the Raft thread just removed simply
    reads as gone, which is what a keepalive racing its expiry should see.
    """

    __slots__ = ("_holder",)

    def __init__(self, holder: StateHolder) -> None:
        self._holder = holder

    def get(self, lease: int, /) -> int | None:
        return self._holder.state.lease_ttl_ms(lease)

    def __len__(self) -> int:
        return self._holder.state.lease_count()
