"""Intentions for the agent's proxies, kept current by a watch.

``IntentionsWatcher`` is the agent's ``intentions`` callable: ``(source,
destination) -> bool``, answered from memory on every proxied connection.
``run()`` loads the table (``intention_list``, a linearizable read) and then
watches every event after that revision (``watch all=True``), applying the
intention events; a change reaches the proxies as soon as the watch delivers
it (well under a second).  A resync snapshot (the watch fell behind or the
node restored a snapshot) carries no intentions, so the table is simply
loaded again.  When the cluster cannot be read the last table stays in
force; before the first load the watcher answers with the registry's
default (allow).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from registry.client import Client
from registry.errors import RegistryError

__all__ = ["IntentionsWatcher"]

log = logging.getLogger("registry.agent.intentions")

RETRY_S_MAX = 5.0


class IntentionsWatcher:
    def __init__(self, client: Client) -> None:
        self._client = client
        self.default = "allow"
        self.table: dict[tuple[str, str], str] = {}
        self.loaded = asyncio.Event()
        #: Registry revision the table reflects.
        self.revision = 0

    def __call__(self, source: str, destination: str) -> bool:
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
            except (RegistryError, OSError) as err:
                log.warning("intentions: %s; keeping the last table, retrying in %.1fs",
                            getattr(err, "message", err), backoff_s)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, RETRY_S_MAX)
