"""The endpoint table of one upstream service, built from its watch stream.

Feed it every item of ``Client.watch(service=NAME, list_first=True)``:

- a ``snapshot`` replaces the table (the first listing, and every resync:
  history compacted, slow watcher, node restored from a snapshot);
- ``events`` upsert (``put``, ``status``) or remove (``delete``, ``expire``)
  instances; deleting the service empties the table;
- ``created`` and ``progress`` only move the revision.

Events at or below the revision the table already reflects are skipped, so a
redelivery never moves the table backwards.  Nothing here ever clears the
table because the cluster went away: while the watch reconnects, the agent
keeps routing from the last table it had, and the resumed watch (from the
next revision, or a snapshot) brings it up to date.

Pure: no I/O.
"""

from __future__ import annotations

from typing import Any

from registry.agent.endpoint import Endpoint, endpoint_from_record

__all__ = ["EndpointTable"]


class EndpointTable:
    def __init__(self, service: str) -> None:
        self.service = service
        self._endpoints: dict[str, Endpoint] = {}
        #: The revision the table reflects (0 before anything arrived).
        self.revision = 0
        #: True once a snapshot (the initial listing) has been applied.
        self.listed = False

    def endpoints(self) -> tuple[Endpoint, ...]:
        return tuple(self._endpoints[i] for i in sorted(self._endpoints))

    def __len__(self) -> int:
        return len(self._endpoints)

    def apply(self, item: dict[str, Any]) -> bool:
        """Apply one watch item; True if the endpoints changed."""
        kind = item.get("type")
        if kind == "snapshot":
            return self._snapshot(item)
        if kind == "events":
            return self._events(item.get("events") or [])
        if kind in ("created", "progress"):
            self.revision = max(self.revision, int(item.get("revision", 0)))
        return False

    def _snapshot(self, item: dict[str, Any]) -> bool:
        revision = int(item["revision"])
        fresh: dict[str, Endpoint] = {}
        for entry in item.get("services") or []:
            if entry.get("service", {}).get("name") != self.service:
                continue
            for record in entry.get("instances") or []:
                ep = endpoint_from_record(record)
                fresh[ep.id] = ep
        changed = fresh != self._endpoints
        self._endpoints = fresh
        self.revision = max(self.revision, revision)
        self.listed = True
        return changed

    def _events(self, events: list[dict[str, Any]]) -> bool:
        floor = self.revision
        changed = False
        for event in events:
            revision = int(event["revision"])
            if revision <= floor:
                continue
            self.revision = max(self.revision, revision)
            if event.get("service") != self.service:
                continue
            what = event.get("kind")
            type_ = event.get("type")
            if what == "instance":
                if type_ in ("put", "status") and event.get("after") is not None:
                    ep = endpoint_from_record(event["after"])
                    if self._endpoints.get(ep.id) != ep:
                        self._endpoints[ep.id] = ep
                        changed = True
                elif type_ in ("delete", "expire"):
                    changed = self._endpoints.pop(str(event.get("id")), None) is not None or changed
            elif what == "service" and type_ == "delete" and self._endpoints:
                self._endpoints.clear()
                changed = True
        return changed
