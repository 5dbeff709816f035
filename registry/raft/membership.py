"""Cluster membership at run time: list, add, remove, transfer leadership.

pysyncobj changes membership one node at a time (no joint consensus) but
does not itself refuse a change while another is uncommitted, so the
leader's service does (``CONFLICT``); changes are made on the leader only,
a follower answers ``NOT_LEADER`` with the leader's API address as hint.
pysyncobj's leader refuses to remove itself: transfer leadership first.
A joining node must already run, started with ``--peers``
listing the current members; it catches up from the leader's snapshot plus
log.  The API address of an added node is kept in the replicated key
``_cluster/members/<raft address>`` so every node can hand out leader hints,
and the identity of its data directory in the state's member identities
(see ``incarnation.py``): given by ``member add`` (``incarnation``, which
``regctl member add`` reads from the new node's API) or recorded by the
leader on first contact (``IncarnationRecorder``); removal forgets both.

``transferLeadership`` touches pysyncobj internals, so it runs in the Raft
thread through a one-shot tick callback, never from the event loop.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from pysyncobj import FAIL_REASON

from registry.config import RAFT_ADDRESS_BYTES_MAX, parse_hostport
from registry.errors import BadRequest, Conflict, NotFound, NotLeader, RegistryError
from registry.raft.incarnation import IncarnationGuard, check_incarnation
from registry.raft.node import RaftNode, StateHolder, submit_error
from registry.server.proposer import Proposer

__all__ = ["MembershipService", "MEMBER_KEY_PREFIX", "IncarnationRecorder"]

MEMBER_KEY_PREFIX = "_cluster/members/"
#: How long a membership change may take to commit before TIMEOUT.
CHANGE_TIMEOUT_S = 10.0
#: How long a leadership transfer waits for the target to match the leader's log.
TRANSFER_CATCH_UP_S = 3.0


class MembershipService:
    def __init__(self, raft: RaftNode, holder: StateHolder, proposer: Proposer,
                 leader_api: Callable[[], str | None], self_api: str,
                 static_apis: dict[str, str] | None = None, guard: IncarnationGuard | None = None) -> None:
        self._raft = raft
        self._guard = guard
        self._holder = holder
        self._proposer = proposer
        self._leader_api = leader_api
        self._self_api = self_api
        self._static_apis = dict(static_apis or {})
        self._in_raft: deque[Callable[[], None]] = deque()
        self._lock = threading.Lock()
        #: The membership change this (leader) node is making, if any: one at a time.
        self._changing: str | None = None
        raft.on_tick(self._run_in_raft_thread)

    def _run_in_raft_thread(self) -> None:
        # Only what was queued before this tick: a function may queue itself again for the next one.
        for _ in range(len(self._in_raft)):
            fn = self._in_raft.popleft()
            fn()

    async def _await(self, start: Callable[[Callable[[Any, int], None]], None],
                     denied: str = "membership change refused by Raft: a new leader has not committed an entry "
                                   "of its term yet, or the change was already made; retry shortly") -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()

        def settle(reason: int) -> None:
            if not future.done():
                future.set_result(reason)

        def done(result: Any, reason: int) -> None:  # Raft thread
            loop.call_soon_threadsafe(settle, reason)

        start(done)
        try:
            reason = await asyncio.wait_for(future, CHANGE_TIMEOUT_S)
        except TimeoutError:
            raise submit_error(-1) from None
        if reason == FAIL_REASON.SUCCESS:
            return
        if reason == FAIL_REASON.REQUEST_DENIED:
            raise Conflict(denied)
        if reason == FAIL_REASON.NOT_LEADER:
            raise NotLeader("only the leader can do this", hint=self._leader_api())
        raise submit_error(reason)

    def _member_apis(self) -> dict[str, str]:
        with self._holder.lock:
            keys = self._holder.state.list_keys(MEMBER_KEY_PREFIX)
        apis = dict(self._static_apis)
        apis.update({k["key"][len(MEMBER_KEY_PREFIX):]: k["value"] for k in keys})
        return apis

    async def list(self, args: dict[str, Any]) -> tuple[int, Any]:
        if args:
            raise BadRequest(f"unknown field(s) {', '.join(sorted(args))}")
        raw = self._raft.status_raw()
        me = self._raft.self_id()
        leader = raw.get("leader")
        leader_id = str(leader.id) if leader is not None else None
        apis = self._member_apis()
        identities = self._holder.state.identities()
        members = [{"raft": me, "api": self._self_api, "self": True, "connected": True,
                    "leader": me == leader_id, "match_index": raw.get("commit_idx"),
                    "incarnation": identities.get(me)}]
        for nid in self._raft.peer_ids():
            members.append({
                "raft": nid,
                "api": apis.get(nid),
                "self": False,
                "connected": raw.get(f"partner_node_status_server_{nid}") == 2,
                "leader": nid == leader_id,
                # Known on the leader only: how far this member's log matches.
                "match_index": raw.get(f"match_idx_server_{nid}"),
                # The data directory the cluster accepts at this address (None: not recorded yet).
                "incarnation": identities.get(nid),
            })
        return self._holder.state.revision, {"members": members, "leader": leader_id}

    def _begin_change(self, what: str) -> None:
        """Admit one membership change at a time, on the leader only.

        pysyncobj 0.3.17 does not serialize changes itself (its ``__changeClusterIDx`` is never
        set, so a second change is appended while the first is uncommitted), and a follower
        forwards a change straight to the leader's Raft, past this service.  So changes are made
        by the leader's service only (a follower answers NOT_LEADER with the leader's address) and
        the leader refuses a second one while the first has not committed.
        """
        if not self._raft.is_leader():
            raise NotLeader("membership changes are made by the leader", hint=self._leader_api())
        if self._changing is not None:
            raise Conflict(f"membership change refused: '{self._changing}' is still in progress; "
                           "retry once it has committed")
        self._changing = what

    async def add(self, args: dict[str, Any]) -> tuple[int, Any]:
        incarnation = args.get("incarnation")
        if incarnation is not None:
            check_incarnation(incarnation)
        raft_addr, api = _member_args({k: v for k, v in args.items() if k != "incarnation"}, allow_api=True)
        if raft_addr == self._raft.self_id() or raft_addr in set(self._raft.peer_ids()):
            raise Conflict(f"{raft_addr} is already a member")
        self._begin_change(f"add {raft_addr}")
        try:
            if incarnation is not None:
                # Recorded before the configuration change: a node that has the
                # new configuration in its log has this record applied too, so
                # no node can count a vote from another disk at that address.
                await self._proposer.write({"op": "identity_put", "raft": raft_addr, "incarnation": incarnation,
                                            "mode": "replace"})
            else:
                # A record left from an earlier member at this address would
                # lock the new one out; the leader records it on first contact.
                await self._proposer.write({"op": "identity_delete", "raft": raft_addr})
                self._forget_seen(raft_addr)
            await self._await(lambda done: self._raft.add_member(raft_addr, done))
            if api is not None:
                await self._proposer.write({"op": "key_put", "key": MEMBER_KEY_PREFIX + raft_addr, "value": api})
        finally:
            self._changing = None
        return self._holder.state.revision, {"added": raft_addr, "api": api}

    async def remove(self, args: dict[str, Any]) -> tuple[int, Any]:
        raft_addr, _ = _member_args(args, allow_api=False)
        me = self._raft.self_id()
        members = set(self._raft.peer_ids()) | {me}
        if raft_addr not in members:
            raise NotFound(f"{raft_addr} is not a member")
        if raft_addr == me and self._raft.is_leader():
            # pysyncobj's leader refuses to remove itself (REQUEST_DENIED): say why and what to do.
            raise Conflict(f"{raft_addr} is the leader and cannot be removed; move leadership first "
                           "(`regctl member transfer-leader`), then remove it")
        self._begin_change(f"remove {raft_addr}")
        try:
            await self._await(lambda done: self._raft.remove_member(raft_addr, done))
            try:
                await self._proposer.write({"op": "key_delete", "key": MEMBER_KEY_PREFIX + raft_addr})
            except RegistryError:
                pass  # NOT_FOUND, or the removal committed and a stale hint entry is harmless
            # Forget the identity, so that the address can be added again with another data directory.
            # If this fails the removal still stands, and `member add` replaces a stale identity anyway.
            try:
                await self._proposer.write({"op": "identity_delete", "raft": raft_addr})
            except RegistryError:
                pass
            self._forget_seen(raft_addr)
        finally:
            self._changing = None
        return self._holder.state.revision, {"removed": raft_addr}

    def _forget_seen(self, raft_addr: str) -> None:
        # What the old process at this address said (it may still be running after its removal)
        # must not be what the leader records for the next member there: that one's first message is.
        if self._guard is not None:
            self._guard.seen.pop(raft_addr, None)

    async def transfer_leader(self, args: dict[str, Any]) -> tuple[int, Any]:
        unknown = set(args) - {"raft"}
        if unknown:
            raise BadRequest(f"unknown field(s) {', '.join(sorted(unknown))}")
        target = args.get("raft")
        if target is not None:
            if not isinstance(target, str):
                raise BadRequest("field 'raft' must be a string")
            parse_hostport(target, what="raft")
        if not self._raft.is_leader():
            raise NotLeader("leadership is transferred by the leader", hint=self._leader_api())
        if target is not None:
            if target == self._raft.self_id():
                raise Conflict(f"{target} is already the leader")
            if target not in set(self._raft.peer_ids()):
                raise NotFound(f"{target} is not a member")
        # pysyncobj denies a transfer unless the target's log matches the leader's last index exactly,
        # which under steady writes holds only between batches: try again on each tick for a while.
        deadline = time.monotonic() + TRANSFER_CATCH_UP_S

        def start(done: Callable[[Any, int], None]) -> None:
            def attempt() -> None:  # Raft thread
                def outcome(result: Any, reason: int) -> None:
                    if reason == FAIL_REASON.REQUEST_DENIED and time.monotonic() < deadline:
                        self._in_raft.append(attempt)
                    else:
                        done(result, reason)

                self._raft.transfer_leadership(target, outcome)

            self._in_raft.append(attempt)

        await self._await(start, denied=f"leadership transfer refused: {target or 'no follower'} did not catch up "
                                        f"with the leader's log within {TRANSFER_CATCH_UP_S:g}s (or is not connected)")
        return self._holder.state.revision, {"requested": target or "most caught-up follower"}


def _member_args(args: dict[str, Any], *, allow_api: bool) -> tuple[str, str | None]:
    allowed = {"raft", "api"} if allow_api else {"raft"}
    unknown = set(args) - allowed
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(sorted(unknown))}")
    raft_addr = args.get("raft")
    if not isinstance(raft_addr, str):
        raise BadRequest("field 'raft' (HOST:PORT) is required")
    parse_hostport(raft_addr, what="raft")
    if len(raft_addr.encode()) > RAFT_ADDRESS_BYTES_MAX:
        # Every Raft message carries its sender's address in a header with a one-byte length
        # (RaftCipher): a member with a longer one could never speak, and the cluster would count it.
        raise BadRequest(f"raft address longer than {RAFT_ADDRESS_BYTES_MAX} bytes")
    api = args.get("api")
    if api is not None:
        if not isinstance(api, str):
            raise BadRequest("field 'api' must be a string")
        parse_hostport(api, what="api")
    return raft_addr, api


class IncarnationRecorder:
    """On the leader: record the incarnation of every member that has none recorded yet.

    Members of a new cluster, and members added without their incarnation,
    are recorded from the first Raft message they send (``IncarnationGuard.seen``).
    Create-only writes (``mode`` create): a record is never replaced here,
    only by ``member add`` after ``member remove``.
    """

    #: How often the leader looks for unrecorded members (a new cluster is unprotected until then).
    PERIOD_S = 0.5

    def __init__(self, raft: RaftNode, holder: StateHolder, proposer: Proposer, guard: IncarnationGuard,
                 own: str) -> None:
        self._raft = raft
        self._holder = holder
        self._proposer = proposer
        self._guard = guard
        self._own = own
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def unrecorded(self) -> dict[str, str]:
        """Members (by Raft address) with no record, and the incarnation to record for each."""
        st = self._raft.raft_status()
        if st.role != "leader":
            return {}
        seen = dict(self._guard.seen)  # filled by the Raft thread; dict() copies atomically
        seen[st.node] = self._own
        members = set(st.peers_connected) | {st.node}
        with self._holder.lock:
            state = self._holder.state
            return {addr: inc for addr, inc in seen.items() if addr in members and state.identity(addr) is None}

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.PERIOD_S)
            for addr, inc in self.unrecorded().items():
                try:
                    await self._proposer.write({"op": "identity_put", "raft": addr, "incarnation": inc,
                                                "mode": "create"})
                except RegistryError:
                    # Lost leadership, or recorded meanwhile (CONFLICT): the next round sees.
                    pass
