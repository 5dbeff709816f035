"""HTTP next to the API port: /metrics, /healthz, /readyz (aiohttp)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .metrics import NodeMetrics

__all__ = ["HTTPServer"]


class HTTPServer:
    def __init__(
        self,
        metrics: NodeMetrics,
        refresh: Callable[[], None],
        readiness: Callable[[], tuple[bool, dict[str, Any]]],
    ) -> None:
        self._metrics = metrics
        self._refresh = refresh
        self._readiness = readiness
        self._runner: web.AppRunner | None = None
        self.app = web.Application()
        self.app.router.add_get("/metrics", self._get_metrics)
        self.app.router.add_get("/healthz", self._get_healthz)
        self.app.router.add_get("/readyz", self._get_readyz)

    async def _get_metrics(self, request: web.Request) -> web.Response:
        self._refresh()
        body = generate_latest(self._metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _get_healthz(self, request: web.Request) -> web.Response:
        # Liveness: the event loop answers. Readiness is /readyz.
        return web.json_response({"status": "ok"})

    async def _get_readyz(self, request: web.Request) -> web.Response:
        ready, detail = self._readiness()
        return web.json_response({"ready": ready, **detail}, status=200 if ready else 503)

    async def start(self, host: str, port: int) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
