"""Intentions for the agent's proxies, kept current by a watch.

``IntentionsWatcher`` is the agent's ``intentions`` callable: ``(source,
destination) -> bool``, answered from memory on every proxied connection.
``run()`` loads the table (``intention_list``, a linearizable read) and then
watches every event after that revision (``watch all=True``), applying the
intention events; a change reaches the proxies as soon as the watch delivers
it (well under a second).  A resync snapshot (the watch fell behind or the
node restored a snapshot) carries no intentions, so the table is simply
loaded again.  When the cluster cannot be read the last table stays in
force.

Until the first load the watcher fails closed: every proxied connection is
refused, and the agent says why (the cluster cannot be reached, or its token
may not read ``intention``).  It used to answer with the registry's default
(allow) until then, and for good if its token could not read intentions, so
a deny was silently not enforced.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from registry.client import Client
from registry.errors import PermissionDenied, RegistryError, Unauthenticated

__all__ = ["IntentionsWatcher"]

log = logging.getLogger("registry.agent.intentions")

RETRY_S_MAX = 5.0
#: At most one "refused: intentions not loaded" warning per this many seconds.
REFUSAL_LOG_PERIOD_S = 10.0


class IntentionsWatcher:
    def __init__(self, client: Client) -> None:
        self._client = client
        self.default = "allow"
        self.table: dict[tuple[str, str], str] = {}
        self.loaded = asyncio.Event()
        #: Registry revision the table reflects.
        self.revision = 0
        #: Connections refused because no table was loaded yet (see the module docstring).
        self.refused_unloaded = 0
        self._refusal_logged_at: float | None = None
        #: Why the table could not be loaded, for the refusal log line.
        self._load_error = "not loaded yet"

    def __call__(self, source: str, destination: str) -> bool:
        if not self.loaded.is_set():
            self.refused_unloaded += 1
            now = time.monotonic()
            if self._refusal_logged_at is None or now - self._refusal_logged_at >= REFUSAL_LOG_PERIOD_S:
                self._refusal_logged_at = now
                log.warning("intentions: refusing %s -> %s: intentions are enforced and none are loaded (%s); "
                            "%d connection(s) refused so far", source, destination, self._load_error,
                            self.refused_unloaded)
            return False
        return self.table.get((source, destination), self.default) == "allow"

    def load(self, revision: int, body: dict[str, Any]) -> None:
        self.default = str(body.get("default", "allow"))
        self.table = {(i["source"], i["destination"]): i["action"] for i in body.get("intentions", [])}
        self.revision = revision
        self.loaded.set()

    def apply(self, event: dict[str, Any]) -> None:
        if event.get("kind") != "intention":
            return
        after = event.get("after")
        before = event.get("before")
        if event.get("id") == "*":
            if isinstance(after, dict):
                self.default = str(after.get("default", "allow"))
            return
        record = after if isinstance(after, dict) else before
        if not isinstance(record, dict):
            return
        pair = (str(record["source"]), str(record["destination"]))
        if isinstance(after, dict):
            self.table[pair] = str(after["action"])
        else:
            self.table.pop(pair, None)

    async def run(self) -> None:
        backoff_s = 0.1
        while True:
            try:
                revision, body = await self._client.call("intention_list", {})
                self.load(revision, body)
                backoff_s = 0.1
                async for item in self._client.watch(all=True, start_revision=revision + 1, progress_ms=1000):
                    kind = item.get("type")
                    if kind == "events":
                        for event in item["events"]:
                            self.apply(event)
                            self.revision = max(self.revision, int(event["revision"]))
                    elif kind == "snapshot":
                        break  # no intentions in a selection snapshot: load the table again
            except asyncio.CancelledError:
                raise
            except (PermissionDenied, Unauthenticated) as err:
                self._load_error = f"the agent's token may not read intentions: {err.message}"
                log.error("intentions: the agent's token may not read intentions (%s): %s; grant it read on "
                          "intention. Retrying in %.1fs", err.message,
                          "keeping the last table" if self.loaded.is_set() else "refusing every proxied connection",
                          backoff_s)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, RETRY_S_MAX)
            except (RegistryError, OSError) as err:
                message = getattr(err, "message", None) or str(err)
                self._load_error = f"the cluster could not be read: {message}"
                log.warning("intentions: %s; %s, retrying in %.1fs", message,
                            "keeping the last table" if self.loaded.is_set() else "refusing every proxied connection",
                            backoff_s)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, RETRY_S_MAX)
