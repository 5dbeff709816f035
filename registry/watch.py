"""Watch hub: bounded history and fan-out of applied events to watchers.

Theory of operation
-------------------
The node hands every applied batch to ``WatchHub.publish`` on its event loop,
in revision order.  The hub keeps a bounded history (by event count and by
bytes) so a watcher can start, or resume after a reconnect, from an older
revision; below the history's floor it gets an explicit resync instead.

Watchers with the same selector (one service, a name prefix, everything)
share one group: each published batch is filtered once per *distinct*
selector, and the matching list is appended to every watcher of the group,
so fan-out cost grows with distinct watches, not watchers.

Each watcher has a bounded queue.  ``publish`` never waits for a watcher: a
watcher whose queue would overflow drops it and is flagged for resync
(reason ``slow``).  The shell then sends it a consistent snapshot at some
revision R read from the state and continues from R + 1; events at or below R
that still arrive are skipped.  So a slow watcher costs bounded memory and
never blocks apply or other watchers.

Pure: no I/O, no clock, no asyncio; ``notify`` callbacks wake the shell.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import msgpack

from .errors import BadRequest, InvalidArgument

__all__ = ["Selector", "Watcher", "WatchHub", "HubLimits", "event_matches", "parse_selector"]

Event = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Selector:
    #: "service" (exactly one service), "prefix" (service names and keys with
    #: this prefix), or "all" (every event, leases and locks too).
    kind: str
    value: str = ""


SELECTOR_VALUE_CHARS_MAX = 512


def parse_selector(args: dict[str, Any]) -> Selector:
    chosen = [k for k in ("service", "prefix", "all") if args.get(k) not in (None, False)]
    if len(chosen) != 1:
        raise BadRequest("a watch needs exactly one of 'service', 'prefix' or 'all'")
    kind = chosen[0]
    if kind == "all":
        if args["all"] is not True:
            raise BadRequest("field 'all' must be true")
        return Selector("all")
    value = args[kind]
    if not isinstance(value, str):
        raise BadRequest(f"field {kind!r} must be a string")
    if len(value) > SELECTOR_VALUE_CHARS_MAX or (kind == "service" and not value):
        raise InvalidArgument(f"{kind} must be 1..{SELECTOR_VALUE_CHARS_MAX} characters")
    return Selector(kind, value)


def event_matches(selector: Selector, event: Event) -> bool:
    kind = selector.kind
    if kind == "all":
        return True
    event_kind = event.get("kind")
    if event_kind in ("service", "instance"):
        service = event.get("service") or ""
        return service == selector.value if kind == "service" else service.startswith(selector.value)
    if kind == "prefix" and event_kind in ("key", "lock"):
        return str(event.get("id") or "").startswith(selector.value)
    return False


@dataclass(frozen=True, slots=True)
class HubLimits:
    #: History kept for resumes: events, and their encoded bytes.
    history_events_max: int = 100_000
    history_bytes_max: int = 64 << 20
    #: Events queued for one watcher before it is resynced instead.
    queue_events_max: int = 10_000
    #: Watchers on one node.
    watchers_max: int = 100_000

    def validate(self) -> None:
        if self.history_events_max < 1 or self.history_bytes_max < 1 or self.queue_events_max < 1:
            raise InvalidArgument("watch limits must be positive")


class Watcher:
    __slots__ = ("_notify", "_pending", "_queue_max", "dropped", "next_revision", "resync_reason", "selector")

    def __init__(self, selector: Selector, next_revision: int, queue_max: int, notify: Callable[[], None]) -> None:
        self.selector = selector
        #: Events below this revision are not for this watcher (already covered).
        self.next_revision = next_revision
        self.resync_reason: str | None = None
        self._pending: deque[Event] = deque()
        self._queue_max = queue_max
        self._notify = notify
        #: Events dropped because the watcher was too slow (for metrics).
        self.dropped = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    def push(self, events: Iterable[Event]) -> bool:
        """Queue the events this watcher still needs; True if that made it overflow (now "slow")."""
        if self.resync_reason is not None:
            return False  # a snapshot will cover these
        fresh = [e for e in events if e["revision"] >= self.next_revision]
        if not fresh:
            return False
        overflow = len(self._pending) + len(fresh) > self._queue_max
        if overflow:
            self.dropped += len(self._pending) + len(fresh)
            self._pending.clear()
            self.resync_reason = "slow"
        else:
            self._pending.extend(fresh)
        self._notify()
        return overflow

    def mark_resync(self, reason: str) -> None:
        self._pending.clear()
        self.resync_reason = reason
        self._notify()

    def resynced(self, revision: int) -> None:
        """The shell sent a snapshot at ``revision``: continue after it."""
        self.resync_reason = None
        self.next_revision = revision + 1
        while self._pending and self._pending[0]["revision"] <= revision:
            self._pending.popleft()

    def take(self, count_max: int) -> list[Event]:
        """Up to ``count_max`` queued events, extended to whole revisions.

        A revision's events are never split across two takes: a client resumes
        from the last revision it received + 1, so a revision cut in half at a
        message boundary would lose its other half on a reconnect.
        """
        out: list[Event] = []
        pending = self._pending
        while pending and (len(out) < count_max or (out and pending[0]["revision"] == out[-1]["revision"])):
            out.append(pending.popleft())
        if out:
            self.next_revision = max(self.next_revision, out[-1]["revision"] + 1)
        return out


class WatchHub:
    def __init__(self, revision: int, limits: HubLimits | None = None) -> None:
        self.limits = limits or HubLimits()
        self.limits.validate()
        #: Highest revision published.
        self.revision = revision
        #: Highest revision whose events are *not* all in history: a watch
        #: starting at or below it needs a resync.
        self.floor = revision
        self._history: deque[tuple[int, list[Event], int]] = deque()
        self._history_events = 0
        self._history_bytes = 0
        self._groups: dict[Selector, set[Watcher]] = {}
        self.watchers = 0
        self.events_published = 0
        #: Watchers flagged for resync by the hub, by reason (compacted, slow,
        #: restore), counted when flagged: a watcher stuck behind a full socket
        #: may never get to send its snapshot, but it was dropped all the same.
        self.resyncs: dict[str, int] = {}

    def _flagged(self, reason: str, count: int = 1) -> None:
        self.resyncs[reason] = self.resyncs.get(reason, 0) + count

    @property
    def distinct(self) -> int:
        return len(self._groups)

    def publish(self, revision: int, events: list[Event]) -> None:
        fresh = [e for e in events if e["revision"] > self.revision]
        if revision <= self.revision and not fresh:
            return
        if fresh:
            size = len(msgpack.packb(fresh, use_bin_type=True))
            self._history.append((fresh[-1]["revision"], fresh, size))
            self._history_events += len(fresh)
            self._history_bytes += size
            self._trim()
            for selector, group in self._groups.items():
                matched = fresh if selector.kind == "all" else [e for e in fresh if event_matches(selector, e)]
                if matched:
                    for watcher in group:
                        if watcher.push(matched):
                            self._flagged("slow")
            self.events_published += len(fresh)
        self.revision = max(self.revision, revision, fresh[-1]["revision"] if fresh else 0)

    def _trim(self) -> None:
        limits = self.limits
        while self._history and (
            self._history_events > limits.history_events_max or self._history_bytes > limits.history_bytes_max
        ):
            last_revision, events, size = self._history.popleft()
            self._history_events -= len(events)
            self._history_bytes -= size
            self.floor = max(self.floor, last_revision)

    def subscribe(self, selector: Selector, start_revision: int | None, notify: Callable[[], None]) -> Watcher:
        """Start a watcher at ``start_revision`` (None: from the next revision)."""
        if self.watchers >= self.limits.watchers_max:
            from .errors import LimitExceeded

            raise LimitExceeded(f"at most {self.limits.watchers_max} watchers per node")
        start = self.revision + 1 if start_revision is None else start_revision
        if start < 1:
            raise InvalidArgument("start_revision must be at least 1")
        watcher = Watcher(selector, start, self.limits.queue_events_max, notify)
        if start <= self.revision:
            if start <= self.floor:
                watcher.mark_resync("compacted")
                self._flagged("compacted")
            else:
                for last_revision, events, _ in self._history:
                    if last_revision < start:
                        continue
                    if watcher.push([e for e in events if event_matches(selector, e)]):
                        self._flagged("slow")
                        break
        self._groups.setdefault(selector, set()).add(watcher)
        self.watchers += 1
        return watcher

    def unsubscribe(self, watcher: Watcher) -> None:
        group = self._groups.get(watcher.selector)
        if group is not None and watcher in group:
            group.discard(watcher)
            self.watchers -= 1
            if not group:
                del self._groups[watcher.selector]

    def reset(self, revision: int) -> None:
        """The state was replaced wholesale (snapshot install) by the state at ``revision``.

        A snapshot ahead of the hub leaves a gap no event covers: the history is
        void and every watcher resyncs (reason ``restore``).  A snapshot at or
        below the hub's revision changes nothing here: Raft only ever installs
        committed state, so it is an older point of the very history the hub
        already published (a follower that caught up from buffered entries can
        then be handed the leader's older snapshot), and the node re-applies
        the same events up to where it was; the hub, its history and every
        watcher stay as they are, and the re-published events are ignored.
        """
        if revision <= self.revision:
            return
        self._history.clear()
        self._history_events = 0
        self._history_bytes = 0
        self.revision = revision
        self.floor = revision
        for group in self._groups.values():
            for watcher in group:
                watcher.mark_resync("restore")
        if self.watchers:
            self._flagged("restore", self.watchers)
