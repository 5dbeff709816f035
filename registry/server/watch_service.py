"""The ``watch`` stream: the asyncio shell around ``WatchHub``.

Wire items (the ``body`` of each stream event):

- ``{"type": "created", "revision": R}`` first: the watch is live; with no
  ``start_revision`` it covers every revision after R.
- ``{"type": "events", "events": [...]}``: events in revision order.  A
  revision's events are never split across messages (a client resumes from
  the last revision it got + 1); messages hold whole revisions up to about
  512 KiB.  A single revision bigger than that comes in pieces, all but the
  last marked ``"partial": true``, which the client joins before delivering.
- ``{"type": "snapshot", "reason": "list"|"compacted"|"slow"|"restore",
  "revision": R, "services": [...], "keys": [...]}``: the whole selection at
  revision R; events after it follow.  Sent for list-then-watch, for a start
  older than the history, for a watcher that fell behind, and after the node
  installed a snapshot ahead of what it had applied.  R is never below a
  revision the stream already covered.
- ``{"type": "progress", "revision": R}``: nothing more for this watch up to
  R (sent every ``progress_ms``, also while events flow).

Cost model.  The hub encodes each published event once and cuts one set of
chunks per distinct selector; every watcher of the selector gets the same
bytes.  A watcher that keeps up is written to from ``publish`` itself
(``StreamSink.try_send_encoded``: a per-stream frame head + the shared body,
queued on the connection and written once per loop pass), so its task does
not even wake.  Only a watcher whose connection is backed up, or that must be
resynced, or that sees events through an ACL filter, goes through its task:
it then sends queued chunks (still shared bytes) and waits for the socket.
Resync snapshots are read and encoded once per (selector, reason, revision).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgpack

from registry.errors import BadRequest, InvalidArgument, NotFound
from registry.fsm.acl import ACL_EVENT_KINDS, event_resource
from registry.fsm.state import RegistryState
from registry.fsm.watch import Selector, WatchHub, event_matches, parse_selector
from registry.raft.node import StateHolder
from registry.server.api import CURRENT_AUTH
from registry.server.metrics import NodeMetrics
from registry.server.server import StreamSink

if TYPE_CHECKING:
    from registry.server.acl_service import AclService

__all__ = ["WatchService"]

log = logging.getLogger("registry.fsm.watch")

#: Events per stream message (soft: a revision is never split across messages).
EVENTS_PER_MESSAGE_MAX = 256
#: Encoded event bytes per stream message (soft, same rule): half the default
#: 1 MiB frame, so 256 events with large records never make a frame too large.
EVENT_BYTES_PER_MESSAGE_MAX = 512 << 10
#: Progress interval bounds, in ms; the default says "alive" every 5 s.
PROGRESS_MS_MIN = 100
PROGRESS_MS_MAX = 60_000
PROGRESS_MS_DEFAULT = 5_000
#: Longest an applied batch waits to be merged with the next ones into one fan-out (only when
#: batches come faster than this; see ``WatchService.publish``).
PUBLISH_LINGER_S = 0.05

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
        #: Encoded snapshot parts by (selector, reason), all at ``_snapshots_revision``.
        self._snapshots: dict[tuple[Selector, str], list[bytes]] = {}
        self._snapshots_revision = -1
        #: hub.events_sent_direct already added to the events counter.
        self._events_exported = 0
        #: Applied batches not yet handed to the hub (see ``publish``).
        self.linger_s = PUBLISH_LINGER_S
        self._pending_events: list[dict[str, Any]] = []
        self._pending_revision = hub.revision
        #: Raft entry bytes behind the pending events, or None once a batch came without (hub.publish).
        self._pending_size_hint: int | None = 0
        self._last_flush = -1e9
        self._flush_handle: asyncio.TimerHandle | None = None

    def publish(self, revision: int, events: list[dict[str, Any]], size_hint: int | None = None) -> None:
        """An applied batch.  Handed to the hub at once when the last hand-off was ``linger_s`` ago,
        else with whatever else arrives until then.

        Under load that merges several applied batches into one fan-out: each
        watcher gets one message (and the node one write per watcher) per
        ``linger_s`` instead of one per Raft batch, which divides the per-watcher
        cost of an event on both ends; an idle node adds no delay.

        ``size_hint``: the bytes of the Raft entry the events came from (see ``WatchHub.publish``).
        """
        self._pending_revision = max(self._pending_revision, revision)
        self._pending_events.extend(events)
        if size_hint is None or self._pending_size_hint is None:
            self._pending_size_hint = None
        else:
            self._pending_size_hint += size_hint
        if self._snapshots and revision > self._snapshots_revision:
            self._snapshots.clear()  # cached snapshot parts are only good for one revision
        if self._acl_listeners and any(e.get("kind") in ACL_EVENT_KINDS for e in events):
            for listener in list(self._acl_listeners):
                listener()
        if self._flush_handle is None:
            wait_s = self._last_flush + self.linger_s - time.monotonic()
            try:
                loop = asyncio.get_running_loop() if wait_s > 0 else None
            except RuntimeError:
                loop = None
            if loop is None:
                self._flush()
            else:
                self._flush_handle = loop.call_later(wait_s, self._flush)
        # The state moved on: a snapshot waiting for it may go (the hub may still lag; a
        # snapshot ahead of the hub is fine, the events it covers are skipped later).
        self._wake_apply_waiters()

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._last_flush = time.monotonic()
        events, self._pending_events = self._pending_events, []
        size_hint, self._pending_size_hint = self._pending_size_hint, 0
        self.hub.publish(self._pending_revision, events, size_hint)
        self._export_events()
        self._export_resyncs()

    def restored(self) -> None:
        self._flush()  # what was applied before the snapshot install goes out first
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
            # asyncio.timeout, not wait_for: Python 3.11's wait_for swallows a cancellation that
            # lands as the future completes, and a cancelled stream would then run on.
            async with asyncio.timeout(timeout_s):
                await future
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

    def _snapshot_parts(self, selector: Selector, reason: str, need: int) -> tuple[int, list[bytes]] | None:
        """Encoded snapshot parts of ``selector`` at the state's revision (None while it is below ``need``).

        Shared per (selector, reason, revision): the watchers of a selector that
        fell behind together (they overflow in the same publish) are resynced
        from one read and one encoding, not one per watcher.
        """
        with self._holder.lock:
            state = self._holder.state
            revision = state.revision
            if revision < need:
                return None
            if self._snapshots_revision != revision:
                self._snapshots.clear()
                self._snapshots_revision = revision
            cached = self._snapshots.get((selector, reason))
            if cached is not None:
                return revision, cached
            body = selection_snapshot(state, selector)
        base = {"type": "snapshot", "reason": reason, "revision": revision}
        parts = [msgpack.packb(part, use_bin_type=True) for part in snapshot_messages(body, base)]
        if self._snapshots_revision == revision:
            self._snapshots[(selector, reason)] = parts
        return revision, parts

    def _export_events(self) -> None:
        # One counter update per publish, not one per watcher per chunk (a locked call each).
        sent = self.hub.events_sent_direct
        if sent > self._events_exported:
            self._metrics.watch_events.inc(sent - self._events_exported)
            self._events_exported = sent

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
        if self._flush_handle is not None:
            # Batches held for merging go out first, so that "from now" means from the node's
            # applied revision, as without the linger.
            self._flush()
        watcher = self.hub.subscribe(selector, start, wake.set)
        self._update_gauges()
        self._export_resyncs()
        try:
            if want_list:
                watcher.mark_resync("list")
            #: The highest revision this stream has told the client about: it resumes after it.
            covered = watcher.next_revision - 1
            sink.send({"type": "created", "revision": covered})
            if acl is None:
                # With ACLs, events are filtered per token: each goes through the task below.
                # Otherwise publish writes the shared bytes itself while the client keeps up
                # (the sink refuses when its socket is backed up: then they queue, bounded).
                watcher.direct = sink.try_send_encoded
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
                    covered = max(covered, watcher.next_revision - 1)
                    need = max(self.hub.revision, covered)
                    if acl is None:
                        found = self._snapshot_parts(selector, reason, need)
                        if found is None:
                            await self._next_apply(progress_s)
                            continue
                        revision, encoded = found
                        # All parts go out before the watcher is live again (no await in between),
                        # so no event can land between two parts of the snapshot.
                        for data in encoded:
                            sink.send_encoded(data)
                    else:
                        with self._holder.lock:
                            state = self._holder.state
                            revision = state.revision
                            body = selection_snapshot(state, selector) if revision >= need else None
                        if body is None:
                            await self._next_apply(progress_s)
                            continue
                        body = {
                            "services": readable(body["services"], lambda s: "service:" + s["service"]["name"]),
                            "keys": readable(body["keys"], lambda k: "key:" + k["key"]),
                        }
                        for part in snapshot_messages(body, {"type": "snapshot", "reason": reason,
                                                             "revision": revision}):
                            sink.send(part)
                    watcher.resynced(revision)
                    covered = revision
                    await sink.drain()
                    continue
                chunks = watcher.take_chunks(EVENT_BYTES_PER_MESSAGE_MAX)
                if chunks:
                    taken_to = chunks[-1].last
                    if acl is None:
                        for chunk in chunks:
                            sink.send_encoded(chunk.body)
                        self._metrics.watch_events.inc(sum(len(chunk.events) for chunk in chunks))
                    else:
                        events = readable([e for chunk in chunks for e in chunk.events], event_resource)
                        for message in event_messages(events):
                            sink.send(message)
                        self._metrics.watch_events.inc(len(events))
                    covered = max(covered, taken_to)
                    await sink.drain()
                    continue
                try:
                    # Not wait_for (see _next_apply): a cancelled watch must end, not leak its watcher.
                    async with asyncio.timeout(progress_s):
                        await wake.wait()
                except TimeoutError:
                    if acl is not None:
                        acl.recheck(principal)  # an expired token ends the stream too
                    # Everything for this watch up to the hub's revision was sent.
                    if watcher.pending == 0 and watcher.resync_reason is None:
                        covered = max(covered, self.hub.revision, watcher.next_revision - 1)
                        sink.send({"type": "progress", "revision": covered})
                        await sink.drain()
        finally:
            watcher.direct = None
            self._acl_listeners.discard(on_acl_change)
            self.hub.unsubscribe(watcher)
            self._update_gauges()


__all__ += ["selection_snapshot", "message_chunks", "event_messages", "snapshot_messages", "event_matches"]
