"""The ``watch`` stream: the asyncio shell around ``WatchHub``.

Wire items (the ``body`` of each stream event):

- ``{"type": "created", "revision": R}`` first: the watch is live; with no
  ``start_revision`` it covers every revision after R.
- ``{"type": "events", "events": [...]}``: events in revision order.
- ``{"type": "snapshot", "reason": "list"|"compacted"|"slow"|"restore",
  "revision": R, "services": [...], "keys": [...]}``: the whole selection at
  revision R; events after it follow.  Sent for list-then-watch, for a start
  older than the history, for a watcher that fell behind, and after the node
  installed a snapshot.
- ``{"type": "progress", "revision": R}``: nothing for this watch up to R.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from .errors import BadRequest, InvalidArgument, NotFound
from .metrics import NodeMetrics
from .replication import StateHolder
from .server import StreamSink
from .state import RegistryState
from .watch import Selector, WatchHub, event_matches, parse_selector

__all__ = ["WatchService"]

log = logging.getLogger("registry.watch")

#: Events per stream message: bounds one frame well under the frame limit.
EVENTS_PER_MESSAGE_MAX = 256
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


class WatchService:
    def __init__(self, hub: WatchHub, holder: StateHolder, metrics: NodeMetrics) -> None:
        self.hub = hub
        self._holder = holder
        self._metrics = metrics

    def publish(self, revision: int, events: list[dict[str, Any]]) -> None:
        self.hub.publish(revision, events)

    def restored(self) -> None:
        with self._holder.lock:
            revision = self._holder.state.revision
        self.hub.reset(revision)

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
        watcher = self.hub.subscribe(selector, start, wake.set)
        self._update_gauges()
        try:
            if want_list:
                watcher.mark_resync("list")
            sink.send({"type": "created", "revision": watcher.next_revision - 1})
            progress_s = progress_ms / 1000.0
            while not sink.closed:
                wake.clear()
                if watcher.resync_reason is not None:
                    reason = watcher.resync_reason
                    with self._holder.lock:
                        state = self._holder.state
                        revision = state.revision
                        body = selection_snapshot(state, selector)
                    watcher.resynced(revision)
                    sink.send({"type": "snapshot", "reason": reason, "revision": revision, **body})
                    if reason != "list":
                        self._metrics.watch_resyncs.labels(reason=reason).inc()
                    await sink.drain()
                    continue
                events = watcher.take(EVENTS_PER_MESSAGE_MAX)
                if events:
                    sink.send({"type": "events", "events": events})
                    self._metrics.watch_events.inc(len(events))
                    await sink.drain()
                    continue
                try:
                    await asyncio.wait_for(wake.wait(), progress_s)
                except TimeoutError:
                    # Everything for this watch up to the hub's revision was sent.
                    if watcher.pending == 0 and watcher.resync_reason is None:
                        revision = max(self.hub.revision, watcher.next_revision - 1)
                        sink.send({"type": "progress", "revision": revision})
                        await sink.drain()
        finally:
            self.hub.unsubscribe(watcher)
            self._update_gauges()


__all__ += ["selection_snapshot", "event_matches"]
