"""Replication: the only module that imports pysyncobj.

Theory of operation
-------------------
``RaftNode`` is a pysyncobj ``SyncObj`` with one replicated method,
``apply_batch(batch)``: ``batch`` is msgpack bytes holding a list of
commands, and applying it is one call into ``RegistryState.apply`` per
command.  A batch is one Raft entry; the proposer (``proposer.py``) packs
many concurrent client commands into it (group commit), because pysyncobj's
cost is per entry (it pickles and unpickles each one).

Messages.  ``RaftTransport`` sends pysyncobj's messages with its framing
but without its per-message zlib compression (``zlib_stored``); the leader
sends one AppendEntries round per tick and holds back a round that would
only carry a new commit index for ``commit_notify_delay_s``, so the next
entry carries it (``RaftNode._flush_sends``).

Threads.  pysyncobj runs one background thread that polls sockets, runs
Raft, applies entries and calls callbacks.  ``RegistryState`` is mutated
only there, under ``StateHolder.lock``; the asyncio thread takes the same
lock to read.  Results reach asyncio through the callback given to
``submit``, which the proposer turns into one ``call_soon_threadsafe``.

Snapshots.  pysyncobj's own snapshot pickles the SyncObj and gzip-9s it,
and without a dump file it keeps the snapshot in memory only, so a restart
after compaction silently lost all data.  We give it a dump file and our
own ``serializer``/``deserializer``: a msgpack envelope with a CRC32 that
holds ``RegistryState.snapshot()`` plus the two log entries and the cluster
pysyncobj needs to resume.  Nothing we own is ever pickled.

Security.  pysyncobj unpickles every message a peer sends, so an open Raft
port is remote code execution.  With a cluster key every message is
encrypted and authenticated; without one the node refuses to start unless
``dev`` is set (``NodeConfig.validate``).  The cipher is ours
(``RaftCipher``: AES-256-GCM), handed to pysyncobj in place of its Fernet:
Fernet costs 50-750 us per message in Python (a fresh cipher object, HMAC
and base64 each time, and the HMAC is checked twice per receive), which was
the largest single CPU cost per Raft entry; one AES-GCM call costs 2-15 us.

Durability.  pysyncobj keeps its log, term and vote in our ``RaftLog``
(``log.py``: append-only segments, a CRC per record, replacing its mmap'd
journal, which was never fsynced), handed over through its journal factory
(``pysyncobj_patch.py``).  Raft is safe only if a node persists before it
speaks, so every message goes through ``SendGate`` (``send_gate.py``): while
the log holds records that are not yet fsynced, messages queue, and around
each poll of the sockets (``_DeadlinePoller.poll``) the gate syncs the log
once and then sends the queue.  One fdatasync thus covers everything a tick
appended, and a follower's AppendEntries success and a vote grant leave
after what they rely on is on disk.  Term and vote are written
synchronously (``RaftLog.setCurrentTerm``).  The leader's AppendEntries go
out at once, so its fsync and its followers' run in parallel (Raft thesis
10.2.1); pysyncobj counts the leader's whole log toward a commit, so
``_onTick`` syncs a leader's log before pysyncobj's commit check, and
``_SyncObj__onBecomeLeader`` syncs the election no-op (a one-node cluster
commits it within the same tick).  ``--unsafe-no-fsync`` keeps the ordering
and the writes but no fdatasync.  If a write or sync fails (ENOSPC, EIO),
the log fails for good, nothing queued is sent, and the node exits
(``on_log_failure``); see docs/durability.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated
from pysyncobj.monotonic import monotonic as raft_clock
from pysyncobj.node import TCPNode
from pysyncobj.serializer import SERIALIZER_STATE
from pysyncobj.syncobj import _RAFT_STATE

from registry.config import NodeConfig
from registry.errors import Internal, RegistryError, Timeout, Unavailable
from registry.fsm.state import RegistryState
from registry.raft.cipher import DEV_MODE_KEY, RaftCipher
from registry.raft.commit_hold import CommitHold
from registry.raft.incarnation import IncarnationGuard
from registry.raft.log import LogRefused, LogWriteFailed, RaftLog, SyncObserver
from registry.raft.pysyncobj_patch import install as install_journal_factory
from registry.raft.send_gate import GatedTransport, SendGate
from registry.raft.snapshot import SNAPSHOT_FORMAT, SNAPSHOT_MAGIC, open_private, read_snapshot_file
from registry.raft.tcp import WireCounters

__all__ = ["StateHolder", "RaftNode", "BatchOutcome", "Listener", "RaftStatus", "apply_entry", "submit_error"]

log = logging.getLogger("registry.raft.node")

install_journal_factory()

#: Exit status of a node whose Raft log could not be written (EX_IOERR in sysexits.h).
EXIT_LOG_FAILED = 74
#: The log's directory in the data dir, and the pysyncobj journal of earlier versions.
RAFT_LOG_DIR = "raft-log"
LEGACY_JOURNAL = "raft.journal"

#: One outcome per command in a batch: (True, result dict) or (False, code, message).
BatchOutcome = list[tuple[Any, ...]]
#: Called in the Raft thread after each applied batch: (revision, events, the entry's bytes).
Listener = Callable[[int, list[dict[str, Any]], int], None]


class StateHolder:
    """The node's current ``RegistryState`` and the lock that guards it.

    A follower that installs a snapshot from the leader gets a whole new
    state object, so readers must go through the holder, never keep the state.
    """

    def __init__(self, state: RegistryState | None = None) -> None:
        self.lock = threading.Lock()
        self.state = state if state is not None else RegistryState()
        #: Bumped whenever the state object is replaced wholesale (snapshot
        #: install): watchers of the old object must resync.
        self.generation = 0
        #: Highest revision this node has applied.  pysyncobj can install a
        #: leader's snapshot older than what a follower already applied (then
        #: re-apply the rest), so the state's revision can dip for a moment;
        #: readers wait until it is back here and never serve below it.
        self.high_water = self.state.revision


@dataclass(frozen=True, slots=True)
class RaftStatus:
    node: str
    role: str
    term: int
    leader: str | None
    commit_index: int
    applied_index: int
    has_quorum: bool
    peers_connected: dict[str, bool]
    log_len: int


_ROLES = {0: "follower", 1: "candidate", 2: "leader"}


def submit_error(reason: int) -> RegistryError:
    """Map a pysyncobj failure reason to our error, saying whether the outcome is known."""
    if reason == FAIL_REASON.QUEUE_FULL:
        return Unavailable("raft proposal queue is full; retry later")
    if reason == FAIL_REASON.MISSING_LEADER:
        return Unavailable("no raft leader at the moment; retry")
    if reason in (FAIL_REASON.DISCARDED, FAIL_REASON.NOT_LEADER, FAIL_REASON.LEADER_CHANGED):
        # The entry may or may not survive the new leader's log: unknown.
        return Timeout("leader changed before the proposal was acknowledged; outcome unknown, retry is safe")
    if reason == FAIL_REASON.REQUEST_DENIED:
        return Unavailable("raft request denied")
    return Timeout(f"proposal outcome unknown (pysyncobj reason {reason})")


def _exit_on_log_failure(exc: LogWriteFailed) -> None:
    """Stop the process: it must acknowledge nothing more (docs/durability.md says why exit, not recover)."""
    log.critical("%s: exiting so that this node acknowledges nothing it could not persist; "
                 "restart it once the disk is writable (the log replays and a torn tail is cut)", exc)
    logging.shutdown()
    os._exit(EXIT_LOG_FAILED)


#: Exit status of a node whose state machine raised something other than a RegistryError (EX_SOFTWARE).
EXIT_APPLY_BUG = 70


def _stop_on_apply_bug(command: Any, exc: BaseException) -> None:
    """Stop the process: a replica that skips a command it could not apply has diverged from the others.

    ``apply`` is deterministic, so a registry error (a refused command) is an
    outcome every replica reaches; anything else is a bug in this process
    (or a half-deployed upgrade) and continuing would serve a state no other
    replica has.  So the node stops, loudly, as etcd panics; restarted, it
    replays the same entry and stops again until the bug is fixed.
    """
    op = command.get("op") if isinstance(command, dict) else None
    log.critical("state machine bug applying op=%r rid=%r: %s: %s; stopping this node rather than diverge "
                 "from its peers", op, command.get("rid") if isinstance(command, dict) else None,
                 type(exc).__name__, exc, exc_info=exc)
    logging.shutdown()
    os._exit(EXIT_APPLY_BUG)


def apply_entry(holder: StateHolder, batch: bytes, entry_term_of: Callable[[], int],
                listeners: Sequence[Listener],
                on_bug: Callable[[Any, BaseException], None] = _stop_on_apply_bug) -> BatchOutcome:
    """Apply one Raft entry (a msgpack list of commands) to the state, then tell ``listeners``.

    ``entry_term_of``: the term of the entry being applied, asked only if a
    command needs it (lease expiries).  ``on_bug``: called with the command
    and the error if the state machine raises anything but a RegistryError
    (the default stops the process, see ``_stop_on_apply_bug``).  Runs in the
    Raft thread.
    """
    try:
        commands = msgpack.unpackb(batch, raw=False)
    except Exception:
        log.error("undecodable raft entry of %d bytes skipped", len(batch))
        return []
    if not isinstance(commands, list):
        log.error("raft entry is not a list of commands; skipped")
        return []
    outcomes: BatchOutcome = []
    events: list[dict[str, Any]] = []
    debug = log.isEnabledFor(logging.DEBUG)
    entry_term: int | None = None
    with holder.lock:
        state = holder.state
        for command in commands:
            if entry_term is None and isinstance(command, dict) and command.get("op") == "lease_expire":
                entry_term = entry_term_of()
            try:
                # trusted: proposers validate before proposing (Proposer.write);
                # apply only runs its structural guard on log entries.
                applied = state.apply(command, trusted=True, entry_term=entry_term)
            except RegistryError as err:
                outcomes.append((False, err.code, err.message))
                continue
            except Exception as err:
                on_bug(command, err)
                # Only a test's on_bug returns: answer the command as failed and go on.
                outcomes.append((False, Internal.code, f"internal error: {type(err).__name__}"))
                continue
            outcomes.append((True, applied.result))
            if debug:
                # The client's request id, logged by every node that applies
                # the command: grep it to follow one write across the cluster.
                log.debug("applied op=%s rid=%s revision=%s", command.get("op"), command.get("rid"),
                          applied.result.get("revision"))
            if applied.events:
                events.extend(applied.events)
        revision = state.revision
        if revision > holder.high_water:
            holder.high_water = revision
    for listener in listeners:
        try:
            listener(revision, events, len(batch))
        except Exception:
            log.exception("apply listener failed")
    return outcomes


class _DeadlinePoller:
    """pysyncobj's poller, with each wait cut short at the node's held-back commit round (if any)."""

    def __init__(self, inner: Any, node: _SyncObjCore) -> None:
        self._inner = inner
        self._node = node

    def poll(self, timeout: float) -> None:
        gate = self._node.send_gate
        # Persist before you speak: what the tick appended is synced before its messages leave,
        # and what the poll appended (entries from the leader) before the replies to it.
        gate.flush()
        due = self._node._commit_hold.due
        if due is not None:
            timeout = max(0.0, min(timeout, due - raft_clock()))
        self._inner.poll(timeout)
        gate.flush()

    def subscribe(self, descr: Any, callback: Any, event_mask: int) -> None:
        self._inner.subscribe(descr, callback, event_mask)

    def unsubscribe(self, descr: Any) -> None:
        self._inner.unsubscribe(descr)


class _SyncObjCore(SyncObj):  # type: ignore[misc]
    """The pysyncobj node itself, with every patch of its behaviour; its whole replicated surface is
    ``apply_batch``.  Only ``RaftNode`` holds one: nothing outside this module sees a SyncObj."""

    def __init__(self, config: NodeConfig, holder: StateHolder, incarnation: str,
                 guard: IncarnationGuard | None = None, *, auto_tick: bool = True,
                 on_fsync: SyncObserver | None = None,
                 on_log_failure: Callable[[LogWriteFailed], None] | None = None) -> None:
        """``auto_tick=False``: no Raft thread; the caller ticks (``_onTick``), as tests do to
        control exactly when each node runs.  ``on_fsync``: called in the Raft thread after each
        fdatasync (seconds, records).
        ``on_log_failure``: called once the log cannot be written; the default exits the process.

        Raises ``LogRefused`` (one line) if the log on disk is corrupted or from an older version."""
        self._holder = holder
        #: The child writing a snapshot (see _save_snapshot), and an outcome to report without one.
        self._snapshot_child: int | None = None
        self._snapshot_outcome: int | None = None
        # Set before SyncObj.__init__: its transport asks for ``encryptor`` as it connects.
        # Dev mode has no secret, but still frames every message with the
        # sender's identity (under a well-known key: authenticates nothing).
        self._cipher = RaftCipher(config.cluster_key or DEV_MODE_KEY, config.raft_addr, incarnation,
                                  guard.check if guard is not None else None)
        #: What the Raft port accepts (read by RaftTransport, which pysyncobj builds in SyncObj.__init__).
        self.wire_limits = config.raft_wire
        self._listeners: list[Listener] = []
        self._on_restore: list[Callable[[], None]] = []
        #: See _onTick: AppendEntries rounds asked for during a tick, sent once at its end.
        self._defer_sends = False
        self._send_wanted = False
        #: See _flush_sends: when a held-back commit-index-only round must go out.
        self._commit_hold = CommitHold(config.raft.commit_notify_delay_s)
        #: See _note_leader: the leader last seen, how often it changed, when a leader was last heard.
        self._leader_seen: Any = None
        self.leader_changes = 0
        self._leader_heard_at = raft_clock()
        data_dir = Path(config.data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        if (data_dir / LEGACY_JOURNAL).exists() and not (data_dir / RAFT_LOG_DIR).exists():
            raise LogRefused(
                f"{data_dir / LEGACY_JOURNAL} is a pysyncobj journal from a version without the fsynced "
                f"raft log, which this version does not read: start this node from an empty data dir "
                f"(it catches up from its peers) or restore a snapshot backup into one")
        fsync = not config.unsafe_no_fsync
        if not fsync:
            log.warning("UNSAFE: --unsafe-no-fsync: the raft log is never fsynced, so a power loss or kernel "
                        "crash can lose acknowledged writes and break Raft's safety; for tests and benchmarks only")
        self._on_log_failure = on_log_failure or _exit_on_log_failure
        self._log_failed = False
        #: The Raft log (built before SyncObj.__init__, which asks the journal factory for it).
        self.wal = RaftLog(data_dir / RAFT_LOG_DIR, fsync=fsync, on_sync=on_fsync)
        #: Every Raft message leaves through this (GatedTransport.send): see the module docstring.
        self.send_gate = SendGate(self.wal)
        timing = config.raft
        conf = SyncObjConf(
            # pysyncobj builds its Fernet from this, but every connection takes
            # the ``encryptor`` property below (``RaftCipher``) instead.  Kept
            # set so that anything in pysyncobj that bypassed the property would
            # fail closed (peers would not understand it) rather than send
            # plaintext.
            password=config.cluster_key,
            # Ship every entry at once instead of waiting for the periodic
            # tick: our own group commit does the batching.
            appendEntriesUseBatch=False,
            appendEntriesPeriod=timing.heartbeat_s,
            raftMinTimeout=timing.election_timeout_min_s,
            raftMaxTimeout=timing.election_timeout_max_s,
            leaderFallbackTimeout=timing.leader_fallback_s,
            connectionTimeout=timing.connect_timeout_s,
            connectionRetryTime=timing.reconnect_period_s,
            logCompactionMinEntries=timing.compaction_entries,
            logCompactionMinTime=timing.compaction_period_s,
            # Our RaftLog, used as it is by the patched journal factory (pysyncobj_patch.py).
            journalFile=self.wal,
            fullDumpFile=str(data_dir / "raft.snapshot"),
            serializer=self._save_snapshot,
            deserializer=self._load_snapshot,
            commandsWaitLeader=True,
            dynamicMembershipChange=True,
            # Snapshots are ours (msgpack), written by a child we fork (see _save_snapshot):
            # pysyncobj never forks for a custom serializer, it asks serializeChecker instead.
            useFork=False,
            serializeChecker=self._snapshot_status,
            # Peers named by DNS (docker compose) get a new IP when their
            # container restarts; pysyncobj's default 600 s cache kept dialing
            # the old one, so a restarted node never caught up. Resolution runs
            # only on a connect attempt, so a short cache costs nothing steady.
            dnsCacheTime=2.0,
            dnsFailCacheTime=1.0,
            autoTick=auto_tick,
        )
        super().__init__(config.raft_addr, list(config.peers), conf, transportClass=GatedTransport)

    # -- one AppendEntries round per tick ------------------------------------------
    #
    # With ``appendEntriesUseBatch`` off (needed for low latency: a new command
    # wakes the Raft thread through pysyncobj's pipe notifier), pysyncobj's
    # leader sent a full AppendEntries round after applying (to carry the new
    # commit index) and another for *each* command it took from its queue, so
    # under load it sent several rounds per tick, each paid for in pickling,
    # encryption, syscalls and the followers' replies.  Here every round asked
    # for during a tick is deferred, and one goes out at the end of the tick's
    # work, before it waits for events: it carries everything appended and the
    # latest commit index.

    def _onTick(self, timeToWait: float = 0.0) -> None:
        if self._log_failed:
            # Never tick again: pysyncobj's thread would keep queuing messages the gate never sends.
            time.sleep(timeToWait)
            return
        self._defer_sends = True
        try:
            try:
                self._read_before_electing()
                if self.wal.entries_dirty and self._isLeader():
                    # pysyncobj's tick opens with the leader's commit check, which counts the
                    # leader's own log in full; its AppendEntries did not wait for this sync
                    # (send_gate.py), so the sync must come before the count.  Rare: the poll's
                    # flush has already synced what the last tick appended.
                    self.send_gate.flush()
                super()._onTick(timeToWait)
            finally:
                # Ticks that return early (transport not ready) never reach _checkCommandsToApply.
                self._flush_sends()
        except LogWriteFailed as exc:
            self._defer_sends = False
            self._log_failed = True
            self._on_log_failure(exc)

    def _note_leader(self) -> None:
        """Count leader changes (to a known leader), once a tick in the Raft thread.

        ``leader_changes`` is a plain int that the metrics read from another
        thread (a racy read of a whole int is fine).
        """
        leader = self._SyncObj__raftLeader
        if leader is not None and leader != self._leader_seen:
            self.leader_changes += 1
        self._leader_seen = leader

    def leader_contact_age_s(self) -> float:
        """Seconds since this node last heard from the leader (0 on the leader; any thread)."""
        if self._isLeader():
            return 0.0
        return max(0.0, float(raft_clock() - self._leader_heard_at))

    def _SyncObj__onBecomeLeader(self) -> None:
        super()._SyncObj__onBecomeLeader()
        # pysyncobj counts the leader's own copy toward a commit at once: in a one-node
        # cluster the no-op (and every older entry with it) commits later in this very tick.
        self.send_gate.flush()

    def _read_before_electing(self) -> None:
        """Read what the peers sent before pysyncobj decides that the leader is gone.

        pysyncobj checks a follower's election deadline at the top of a tick,
        before the tick's poll reads the sockets.  After a long stretch of the
        Raft thread's own work (a big batch to apply, a starved CPU; snapshots
        took 0.1-0.45 s here before they moved to a child process), the
        leader's heartbeats sat unread in the socket while the deadline
        passed, and the follower started an election against a healthy
        leader: one leader change in about one benchmark run in three.
        Reading first lets those heartbeats reset the deadline.
        """
        if self._SyncObj__raftState != _RAFT_STATE.LEADER and self._SyncObj__raftElectionDeadline < raft_clock():
            self._poller.poll(0)

    def _checkCommandsToApply(self) -> None:
        super()._checkCommandsToApply()
        self._note_leader()
        # The last step of a tick that sends; then compaction, callbacks and the wait for events.
        self._flush_sends()

    def _SyncObj__sendAppendEntries(self) -> None:
        if self._defer_sends:
            self._send_wanted = True
            return
        super()._SyncObj__sendAppendEntries()

    def _flush_sends(self) -> None:
        """Send the round the tick asked for, or hold back one that would only carry the commit index.

        After a commit the leader owes its followers the new commit index.  A
        round carrying only that costs each follower a message and a reply,
        as much as the entry itself: at one write in flight it was half of the
        cluster's Raft messages and CPU.  So if no follower has entries to
        receive, no heartbeat is due and ``commit_notify_delay_s`` is set, the
        round waits up to that long; the next entry's round (a client writing
        in a loop sends one within a fraction of a millisecond) carries the
        commit index instead, and the poller wakes for the deadline otherwise.
        ``CommitHold`` stops holding while entries come further apart than that.
        """
        self._defer_sends = False
        hold = self._commit_hold
        if not self._send_wanted and hold.due is None:
            return
        if not self._isLeader():  # it may have stepped down since asking
            self._send_wanted = False
            hold.reset()
            return
        now = raft_clock()
        wanted = self._send_wanted
        self._send_wanted = False
        only_commit_index = wanted and hold.delay_s > 0 and self._only_commit_index_to_send(now)
        if hold.decide(now, wanted, only_commit_index):
            super()._SyncObj__sendAppendEntries()

    def _only_commit_index_to_send(self, now: float) -> bool:
        """True if a round now would carry no entries to any connected follower and no heartbeat is due."""
        if now >= self._SyncObj__newAppendEntriesTime:
            return False
        last_index = self._SyncObj__getCurrentLogIndex()
        next_index = self._SyncObj__raftNextIndex
        connected = self._SyncObj__connectedNodes
        for node in self._SyncObj__otherNodes | self._SyncObj__readonlyNodes:
            if node in connected and next_index.get(node, 0) <= last_index:
                return False
        return True

    @property
    def _poller(self) -> Any:
        return self._capped_poller

    @_poller.setter
    def _poller(self, poller: Any) -> None:
        # pysyncobj assigns its poller in SyncObj.__init__; wrapping it here
        # lets a held-back commit round wake the tick in time (see _flush_sends).
        self._capped_poller = _DeadlinePoller(poller, self)

    def _SyncObj__onMessageReceived(self, node: Any, message: Any) -> None:
        """pysyncobj's message handler, with the leader's next index for a follower never moving backwards.

        pysyncobj sends entries before earlier ones are acknowledged (it
        advances a follower's next index as it sends), but on a success reply
        it sets the next index to what *that* reply acknowledged.  A reply to
        an earlier message therefore moved it back, and the leader sent the
        same entries again: the follower truncated and re-appended them,
        logging CRITICAL "truncating already-applied log entries" in normal
        operation and doing the work twice.  A success reply only ever moves
        the index forward here; a follower that is missing entries answers
        with ``reset``, which still moves it back.
        """
        if message.get("type") == "next_node_idx" and message.get("success") and not message.get("reset"):
            next_index = self._SyncObj__raftNextIndex
            before = next_index.get(node)
            super()._SyncObj__onMessageReceived(node, message)
            after = next_index.get(node)
            if before is not None and after is not None and after < before:
                next_index[node] = before
            return
        super()._SyncObj__onMessageReceived(node, message)
        if message.get("type") == "append_entries" and self._SyncObj__raftLeader == node:
            # What pysyncobj resets its election deadline on: the leader of this term was heard.
            self._leader_heard_at = raft_clock()

    @property
    def messages_sent(self) -> int:
        """Raft messages this process has sent to peers (all of them go through the cipher)."""
        return self._cipher.messages_sent

    @property
    def encryptor(self) -> RaftCipher:
        """What pysyncobj's transport encrypts with (overrides its Fernet)."""
        return self._cipher

    # -- the replicated surface -------------------------------------------------

    @replicated  # type: ignore[untyped-decorator]
    def apply_batch(self, batch: bytes) -> BatchOutcome:
        return self._apply_batch(batch)

    def _apply_batch(self, batch: bytes) -> BatchOutcome:
        return apply_entry(self._holder, batch, self._applying_entry_term, self._listeners)

    def _applying_entry_term(self) -> int:
        """The Raft term of the entry being applied (pysyncobj applies index last_applied + 1)."""
        entries = self._SyncObj__getEntries(self.raftLastApplied + 1, 1)
        return int(entries[0][2]) if entries else -1

    # -- used by the proposer and the server ------------------------------------

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def add_restore_hook(self, hook: Callable[[], None]) -> None:
        self._on_restore.append(hook)

    def raft_status(self) -> RaftStatus:
        raw = self.getStatus()
        peers = {
            key[len("partner_node_status_server_"):]: value == 2
            for key, value in raw.items()
            if key.startswith("partner_node_status_server_")
        }
        leader = raw.get("leader")
        return RaftStatus(
            node=str(self.selfNode.id),
            role=_ROLES.get(int(raw.get("state", 0)), "unknown"),
            term=int(raw.get("raft_term", 0)),
            leader=str(leader.id) if leader is not None else None,
            commit_index=int(raw.get("commit_idx", 0)),
            applied_index=int(raw.get("last_applied", 0)),
            has_quorum=bool(raw.get("has_quorum", False)),
            peers_connected=peers,
            log_len=int(raw.get("log_len", 0)),
        )

    # -- snapshots (called by pysyncobj in the Raft thread) ----------------------

    def _save_snapshot(self, filename: str, raft_data: Sequence[Any]) -> None:
        """pysyncobj's serializer: fork a child that writes our snapshot file, and return.

        Written in the Raft thread, a snapshot stopped it (and, while the state
        was encoded under the lock, every request on the node) for 0.1-0.7 s
        with 5 MB of state on this machine: a p99 of 670-730 ms at 256 writes in
        flight whenever a compaction fell into a benchmark run, and followers
        that missed heartbeats meanwhile.  The child has a copy-on-write view of
        the state as of the fork; it writes ``raft.snapshot`` itself (a ``.part``
        file, fsynced, renamed over the old one) and exits; ``_snapshot_status``
        reaps it and tells pysyncobj, which only then drops journal entries.

        ``filename`` is pysyncobj's ``raft.snapshot.tmp``, which it renames over
        ``raft.snapshot`` as this returns: that file must not exist (a stale one
        would replace the good snapshot), so the rename fails and is ignored.
        """
        final = filename[: -len(".tmp")] if filename.endswith(".tmp") else filename
        with contextlib.suppress(FileNotFoundError):
            os.remove(filename)
        try:
            pid = os.fork()
        except OSError as err:
            log.error("cannot fork to write a snapshot, compaction skipped: %s", err)
            self._snapshot_outcome = SERIALIZER_STATE.FAILED
            return
        if pid == 0:
            code = 1
            try:
                self._write_snapshot(final, raft_data)
                code = 0
            except BaseException:
                with contextlib.suppress(BaseException):
                    log.exception("writing the snapshot failed")
            finally:
                os._exit(code)
        self._snapshot_child = pid

    def _snapshot_status(self) -> int:
        """pysyncobj's serializeChecker: is the snapshot child still writing, done, or failed?"""
        if self._snapshot_outcome is not None:
            outcome, self._snapshot_outcome = self._snapshot_outcome, None
            return outcome
        pid = self._snapshot_child
        if pid is None:
            return int(SERIALIZER_STATE.NOT_SERIALIZING)
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            self._snapshot_child = None
            return int(SERIALIZER_STATE.FAILED)
        if done == 0:
            return int(SERIALIZER_STATE.SERIALIZING)
        self._snapshot_child = None
        return int(SERIALIZER_STATE.SUCCESS if os.waitstatus_to_exitcode(status) == 0 else SERIALIZER_STATE.FAILED)

    def _write_snapshot(self, path: str, raft_data: Sequence[Any]) -> None:
        """Write our snapshot file at ``path`` (in the snapshot child: see ``_save_snapshot``).

        Only the forking thread exists in the child, and it is the one thread that
        changes the state, so the state is consistent without the lock, which must
        not be taken: another thread may have held it at the fork.
        """
        last_entry, prev_entry, cluster = raft_data
        started = time.monotonic()
        state_bytes = self._holder.state.snapshot()
        encoded_s = time.monotonic() - started
        body = msgpack.packb(
            {
                "format": SNAPSHOT_FORMAT,
                "state": state_bytes,
                "last": list(last_entry),
                "prev": list(prev_entry),
                "cluster": sorted(str(node.id) for node in cluster),
            },
            use_bin_type=True,
        )
        part = f"{path}.part"
        with open_private(part) as f:
            f.write(SNAPSHOT_MAGIC)
            f.write(zlib.crc32(body).to_bytes(4, "big"))
            f.write(body)
            f.flush()
            # pysyncobj drops journal entries once told of success: the bytes must be on disk first.
            os.fsync(f.fileno())
        os.replace(part, path)
        log.info("snapshot written by a forked child: %d bytes, raft index %s, in %.3f s (state encoded in %.3f s)",
                 len(body), last_entry[1], time.monotonic() - started, encoded_s)

    def _load_snapshot(self, filename: str) -> tuple[Any, Any, set[Any]]:
        envelope = read_snapshot_file(filename)
        state = RegistryState.restore(envelope["state"], self._holder.state.limits)
        with self._holder.lock:
            self._holder.state = state
            self._holder.generation += 1
            self._holder.high_water = max(self._holder.high_water, state.revision)
        for hook in self._on_restore:
            try:
                hook()
            except Exception:
                log.exception("restore hook failed")
        log.info("snapshot loaded: revision %d, raft index %s", state.revision, envelope["last"][1])
        last = tuple(envelope["last"])
        prev = tuple(envelope["prev"])
        cluster = {TCPNode(node_id) for node_id in envelope["cluster"]}
        return last, prev, cluster


class RaftNode:
    """A node's Raft, behind the narrow surface the rest of the node uses (hashicorp/raft's ``api.go`` shape).

    It *has* a pysyncobj ``SyncObj`` (``_SyncObjCore``) rather than being one,
    so pysyncobj's methods, name-mangled privates and thread stay behind this
    class: proposals (``submit``), leadership (``is_leader``, ``term``,
    ``raft_status``), membership (``add_member``, ``remove_member``,
    ``transfer_leadership``), work in the Raft thread (``on_tick``), the log's
    numbers and the lifecycle (``tick`` for tests that drive it, ``stop``).

    ``auto_tick=False``: no Raft thread; the caller calls ``tick``, as tests do
    to control exactly when each node runs.  ``on_fsync``: called in the Raft
    thread after each fdatasync (seconds, records).  ``on_log_failure``: called
    once the log cannot be written; the default exits the process.  Raises
    ``LogRefused`` (one line) if the log on disk is corrupted or from an older
    version.
    """

    def __init__(self, config: NodeConfig, holder: StateHolder, incarnation: str,
                 guard: IncarnationGuard | None = None, *, auto_tick: bool = True,
                 on_fsync: SyncObserver | None = None,
                 on_log_failure: Callable[[LogWriteFailed], None] | None = None) -> None:
        self._core = _SyncObjCore(config, holder, incarnation, guard, auto_tick=auto_tick, on_fsync=on_fsync,
                                  on_log_failure=on_log_failure)
        #: The Raft log on disk and the gate every Raft message leaves through.
        self.wal: RaftLog = self._core.wal
        self.send_gate: SendGate = self._core.send_gate
        #: What the Raft port's guards refused (registry/raft/tcp.py), for the node's metrics.
        self.wire_counters: WireCounters = self._core._SyncObj__transport.wire_counters

    # -- proposals and applied batches ----------------------------------------------

    def submit(self, batch: bytes, done: Callable[[Any, int], None]) -> None:
        """Queue one batch; ``done(outcomes, fail_reason)`` runs in the Raft thread."""
        self._core.apply_batch(batch, callback=done)

    def add_listener(self, listener: Listener) -> None:
        """Called in the Raft thread after each applied batch (see ``Listener``)."""
        self._core.add_listener(listener)

    def add_restore_hook(self, hook: Callable[[], None]) -> None:
        """Called in the Raft thread after a snapshot replaced the state."""
        self._core.add_restore_hook(hook)

    def snapshot_soon(self) -> None:
        """Snapshot the state and compact the log at the next chance (a seeded data dir)."""
        self._core.forceLogCompaction()

    # -- leadership and status (any thread: racy reads of single attributes) --------

    def is_leader(self) -> bool:
        return bool(self._core._isLeader())

    def term(self) -> int:
        return int(self._core.raftCurrentTerm)

    def leader_known(self) -> bool:
        """True if this node knows a leader (itself or a peer) in its current term."""
        return self._core._getLeader() is not None

    def raft_status(self) -> RaftStatus:
        return self._core.raft_status()

    def status_raw(self) -> dict[str, Any]:
        """pysyncobj's own status map (match indexes and the like, for the member list)."""
        raw: dict[str, Any] = self._core.getStatus()
        return raw

    def self_id(self) -> str:
        return str(self._core.selfNode.id)

    def peer_ids(self) -> list[str]:
        """The other members' Raft addresses, sorted."""
        return sorted(str(node.id) for node in self._core.otherNodes)

    def leader_contact_age_s(self) -> float:
        return self._core.leader_contact_age_s()

    @property
    def leader_changes(self) -> int:
        return self._core.leader_changes

    @property
    def messages_sent(self) -> int:
        return self._core.messages_sent

    # -- membership (leader only; ``done(result, fail_reason)`` runs in the Raft thread) --

    def add_member(self, raft_addr: str, done: Callable[[Any, int], None]) -> None:
        self._core.addNodeToCluster(raft_addr, callback=done)

    def remove_member(self, raft_addr: str, done: Callable[[Any, int], None]) -> None:
        self._core.removeNodeFromCluster(raft_addr, callback=done)

    def transfer_leadership(self, target: str | None, done: Callable[[Any, int], None]) -> None:
        """To ``target``, or the most caught-up follower if None.  Call it in the Raft thread
        (``on_tick``): it reads pysyncobj's match indexes."""
        self._core.transferLeadership(target, callback=done)

    def on_tick(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` in the Raft thread at the end of every tick."""
        self._core.addOnTickCallback(callback)

    # -- lifecycle ------------------------------------------------------------------

    def tick(self, timeout_s: float = 0.0) -> None:
        """One Raft tick, waiting up to ``timeout_s`` for events (only with ``auto_tick=False``)."""
        self._core._onTick(timeout_s)

    def stop(self) -> None:
        """Stop the Raft thread and close the log."""
        self._core.destroy()
