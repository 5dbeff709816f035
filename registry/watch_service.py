"""The ``watch`` stream: the asyncio shell around ``WatchHub``.

Wire items (the ``body`` of each stream event):

- ``{"type": "created", "revision": R}`` first: the watch is live; with no
  ``start_revision`` it covers every revision after R.
- ``{"type": "events", "events": [...]}``: events in revision order.  A
  revision's events are never split across messages (a client resumes from
  the last revision it got + 1); messages hold at most about 256 events or
  512 KiB, except that one revision bigger than that is one message.
- ``{"type": "snapshot", "reason": "list"|"compacted"|"slow"|"restore",
  "revision": R, "services": [...], "keys": [...]}``: the whole selection at
  revision R; events after it follow.  Sent for list-then-watch, for a start
  older than the history, for a watcher that fell behind, and after the node
  installed a snapshot ahead of what it had applied.  R is never below a
  revision the stream already covered.
- ``{"type": "progress", "revision": R}``: nothing for this watch up to R.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgpack

from .acl import ACL_EVENT_KINDS, event_resource
from .api import CURRENT_AUTH
from .errors import BadRequest, InvalidArgument, NotFound
from .metrics import NodeMetrics
from .replication import StateHolder
from .server import StreamSink
from .state import RegistryState
from .watch import Selector, WatchHub, event_matches, parse_selector

if TYPE_CHECKING:
    from .acl_service import AclService

__all__ = ["WatchService"]

log = logging.getLogger("registry.watch")

#: Events per stream message (soft: a revision is never split across messages).
EVENTS_PER_MESSAGE_MAX = 256
#: Encoded event bytes per stream message (soft, same rule): half the default
#: 1 MiB frame, so 256 events with large records never make a frame too large.
EVENT_BYTES_PER_MESSAGE_MAX = 512 << 10
#: Progress interval bounds, in ms; the default says "alive" every 5 s.
PROGRESS_MS_MIN = 100
PROGRESS_MS_MAX = 60_000
PROGRESS_MS_DEFAULT = 5_000

_ARGS = {"service", "prefix", "all", "start_revision", "list", "progress_ms"}


def selection_snapshot(state: RegistryState, selector: Selector) -> dict[str, Any]:
    """The selected services (with instances) and keys, as one consistent read."""
    services: list[dict[str, Any]] = []
    keys: list[dict[str, Any]] = []
    if selector.kind == "service":
        try:
            services.append(state.get_service(selector.value))
        except NotFound:
            pass
    else:
        prefix = selector.value if selector.kind == "prefix" else ""
        for item in state.list_services():
            if item["name"].startswith(prefix):
                services.append(state.get_service(item["name"]))
        keys = state.list_keys(prefix)
    return {"services": services, "keys": keys}


def _size(obj: Any) -> int:
    return len(msgpack.packb(obj, use_bin_type=True))


def event_messages(events: list[dict[str, Any]], bytes_max: int = EVENT_BYTES_PER_MESSAGE_MAX,
                   ) -> list[dict[str, Any]]:
    """Wire messages for ``events``: whole revisions where they fit in ``bytes_max``.

    A revision too large for one message (a lease revoke dropping thousands of
    instances) is split over several, all but the last marked ``partial``: the
    client holds partial pieces back and delivers the revision only once it
    is complete, so a resume never sees half a revision.
    """
    out: list[dict[str, Any]] = []
    for chunk in message_chunks(events, bytes_max):
        if len(chunk) > 1 and _size(chunk) > bytes_max:
            piece: list[dict[str, Any]] = []
            size = 0
            for event in chunk:
                event_size = _size(event)
                if piece and size + event_size > bytes_max:
                    out.append({"type": "events", "events": piece, "partial": True})
                    piece, size = [], 0
                piece.append(event)
                size += event_size
            out.append({"type": "events", "events": piece})
        else:
            out.append({"type": "events", "events": chunk})
    return out


def snapshot_messages(body: dict[str, Any], base: dict[str, Any], bytes_max: int = EVENT_BYTES_PER_MESSAGE_MAX,
                      ) -> list[dict[str, Any]]:
    """Split a selection snapshot into messages of at most about ``bytes_max``.

    Each part has ``services`` (a service may appear in several parts, each
    with a slice of its instances) and ``keys``; every part but the last says
    ``more``.  The client merges the parts and moves its resume point only
    after the last one.
    """
    parts: list[dict[str, Any]] = []
    services: list[dict[str, Any]] = []
    keys: list[dict[str, Any]] = []
    size = 0

    def flush() -> None:
        nonlocal services, keys, size
        parts.append({**base, "services": services, "keys": keys, "more": True})
        services, keys, size = [], [], 0

    for svc in body["services"]:
        head = {"service": svc["service"], "instances": []}
        services.append(head)
        size += _size(svc["service"])
        for inst in svc["instances"]:
            inst_size = _size(inst)
            if size + inst_size > bytes_max and (len(services) > 1 or head["instances"]):
                flush()
                head = {"service": svc["service"], "instances": []}
                services.append(head)
                size = _size(svc["service"])
            head["instances"].append(inst)
            size += inst_size
    for key in body["keys"]:
        key_size = _size(key)
        if size + key_size > bytes_max and (services or keys):
            flush()
        keys.append(key)
        size += key_size
    parts.append({**base, "services": services, "keys": keys, "more": False})
    return parts


def message_chunks(events: list[dict[str, Any]], bytes_max: int = EVENT_BYTES_PER_MESSAGE_MAX,
                   ) -> list[list[dict[str, Any]]]:
    """Split events (in revision order) into messages of whole revisions of at most ``bytes_max``.

    A single revision larger than ``bytes_max`` still makes one message of its
    own: a client resumes from the last revision it received + 1, so a revision
    must never be split across messages.
    """
    chunks: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []
    size = 0
    i = 0
    while i < len(events):
        revision = events[i]["revision"]
        j = i + 1
        while j < len(events) and events[j]["revision"] == revision:
            j += 1
        group = events[i:j]
        group_size = len(msgpack.packb(group, use_bin_type=True))
        if current and size + group_size > bytes_max:
            chunks.append(current)
            current, size = [], 0
        current.extend(group)
        size += group_size
        i = j
    if current:
        chunks.append(current)
    return chunks


class WatchService:
    def __init__(self, hub: WatchHub, holder: StateHolder, metrics: NodeMetrics) -> None:
        self.hub = hub
        self._holder = holder
        self._metrics = metrics
        #: hub.resyncs already added to the resync counter, by reason.
        self._resyncs_exported: dict[str, int] = {}
        #: Handlers waiting for the next applied batch (see ``_next_apply``).
        self._apply_waiters: list[asyncio.Future[None]] = []
        #: With ACLs on (set by the node): streams carry only what their token may read.
        self.acl: AclService | None = None
        #: Streams to wake when an ACL record changes (they re-check their token).
        self._acl_listeners: set[Callable[[], None]] = set()

    def publish(self, revision: int, events: list[dict[str, Any]]) -> None:
        self.hub.publish(revision, events)
        if self._acl_listeners and any(e.get("kind") in ACL_EVENT_KINDS for e in events):
            for listener in list(self._acl_listeners):
                listener()
        self._export_resyncs()
        self._wake_apply_waiters()

    def restored(self) -> None:
        with self._holder.lock:
            revision = self._holder.state.revision
        self.hub.reset(revision)
        self._export_resyncs()
        self._wake_apply_waiters()

    def _wake_apply_waiters(self) -> None:
        waiters, self._apply_waiters = self._apply_waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)

    async def _next_apply(self, timeout_s: float) -> None:
        """Wait for the next applied batch (or the timeout)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._apply_waiters.append(future)
        try:
            await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            pass
        finally:
            if future in self._apply_waiters:
                self._apply_waiters.remove(future)

    def _export_resyncs(self) -> None:
        """Count resyncs when the hub flags them, not when the snapshot goes out (it may never)."""
        for reason, count in self.hub.resyncs.items():
            delta = count - self._resyncs_exported.get(reason, 0)
            if delta > 0:
                self._metrics.watch_resyncs.labels(reason=reason).inc(delta)
                self._resyncs_exported[reason] = count

    def _update_gauges(self) -> None:
        self._metrics.watchers.set(self.hub.watchers)
        self._metrics.watches_distinct.set(self.hub.distinct)

    async def watch(self, args: dict[str, Any], sink: StreamSink) -> None:
        unknown = set(args) - _ARGS
        if unknown:
            raise BadRequest(f"unknown field(s) {', '.join(sorted(unknown))}")
        selector = parse_selector(args)
        start = args.get("start_revision")
        if start is not None and (not isinstance(start, int) or isinstance(start, bool)):
            raise BadRequest("field 'start_revision' must be an integer")
        want_list = args.get("list", False)
        if not isinstance(want_list, bool):
            raise BadRequest("field 'list' must be a boolean")
        progress_ms = args.get("progress_ms", PROGRESS_MS_DEFAULT)
        if not isinstance(progress_ms, int) or not PROGRESS_MS_MIN <= progress_ms <= PROGRESS_MS_MAX:
            raise InvalidArgument(f"progress_ms must be an integer in {PROGRESS_MS_MIN}..{PROGRESS_MS_MAX}")
        wake = asyncio.Event()
        acl = self.acl
        principal = (CURRENT_AUTH.get() or "") if acl is not None else ""
        acl_changed = [False]

        def on_acl_change() -> None:
            acl_changed[0] = True
            wake.set()

        def readable(items: list[dict[str, Any]], resource: Callable[[dict[str, Any]], str]) -> list[dict[str, Any]]:
            if acl is None:
                return items
            now = int(time.time() * 1000)
            with self._holder.lock:
                state = self._holder.state
                return [i for i in items if acl.visible(state, principal, resource(i), now)]

        if acl is not None:
            self._acl_listeners.add(on_acl_change)
        watcher = self.hub.subscribe(selector, start, wake.set)
        self._update_gauges()
        self._export_resyncs()
        try:
            if want_list:
                watcher.mark_resync("list")
            #: The highest revision this stream has told the client about: it resumes after it.
            covered = watcher.next_revision - 1
            sink.send({"type": "created", "revision": covered})
            progress_s = progress_ms / 1000.0
            while not sink.closed:
                wake.clear()
                if acl is not None and acl_changed[0]:
                    acl_changed[0] = False
                    acl.recheck(principal)  # a revoked token ends the stream (UNAUTHENTICATED)
                if watcher.resync_reason is not None:
                    reason = watcher.resync_reason
                    # A snapshot must cover everything the hub published (the watcher's queue was
                    # dropped; older events are not pushed again) and everything the client has.
                    # The state is normally ahead of the hub; it is behind only after the node
                    # installed a snapshot older than what it had applied, and then re-applies.
                    need = max(self.hub.revision, covered)
                    with self._holder.lock:
                        state = self._holder.state
                        revision = state.revision
                        body = selection_snapshot(state, selector) if revision >= need else None
                    if body is None:
                        await self._next_apply(progress_s)
                        continue
                    watcher.resynced(revision)
                    covered = revision
                    if acl is not None:
                        body = {
                            "services": readable(body["services"], lambda s: "service:" + s["service"]["name"]),
                            "keys": readable(body["keys"], lambda k: "key:" + k["key"]),
                        }
                    for part in snapshot_messages(body, {"type": "snapshot", "reason": reason, "revision": revision}):
                        sink.send(part)
                        await sink.drain()
                    continue
                events = watcher.take(EVENTS_PER_MESSAGE_MAX)
                if events and acl is not None:
                    taken_to = events[-1]["revision"]
                    events = readable(events, event_resource)
                    if not events:
                        covered = max(covered, taken_to)
                        continue
                if events:
                    for message in event_messages(events):
                        chunk = message["events"]
                        if not message.get("partial"):
                            covered = max(covered, chunk[-1]["revision"])
                        sink.send(message)
                        self._metrics.watch_events.inc(len(chunk))
                        await sink.drain()
                    continue
                try:
                    await asyncio.wait_for(wake.wait(), progress_s)
                except TimeoutError:
                    if acl is not None:
                        acl.recheck(principal)  # an expired token ends the stream too
                    # Everything for this watch up to the hub's revision was sent.
                    if watcher.pending == 0 and watcher.resync_reason is None:
                        covered = max(covered, self.hub.revision, watcher.next_revision - 1)
                        sink.send({"type": "progress", "revision": covered})
                        await sink.drain()
        finally:
            self._acl_listeners.discard(on_acl_change)
            self.hub.unsubscribe(watcher)
            self._update_gauges()


__all__ += ["selection_snapshot", "message_chunks", "event_messages", "snapshot_messages", "event_matches"]
