"""HTTP next to the API port (aiohttp): metrics, health, and read-only JSON.

- ``/metrics``: Prometheus text format.
- ``/healthz``: the process answers; ``/readyz``: a leader is known and this
  node has applied everything committed (503 otherwise).
- ``/v1/status``, ``/v1/services``, ``/v1/services/{name}``: JSON for people
  and tools; ``?consistency=stale`` reads locally, the default is
  linearizable.  Each answer carries ``X-Regctl-Revision``.
- ``/v1/sd``: Prometheus ``http_sd_configs`` targets, one group per passing
  instance, labelled with service, instance id, node-independent metadata.

Every JSON endpoint goes through the same op handlers as the binary API, so
the two can never disagree; errors map to HTTP statuses by error code.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from registry.errors import PermissionDenied, RegistryError, Unauthenticated, error_to_wire
from registry.fsm.acl import hash_secret
from registry.server.metrics import NodeMetrics

if TYPE_CHECKING:
    from registry.server.acl_service import AclService

__all__ = ["HTTPServer", "HTTP_STATUS_BY_CODE", "sd_targets"]

Handle = Callable[[str, dict[str, Any]], Awaitable[tuple[int, Any]]]

HTTP_STATUS_BY_CODE = {
    "BAD_REQUEST": 400,
    "UNKNOWN_OP": 400,
    "INVALID_NAME": 400,
    "INVALID_ARGUMENT": 400,
    "LIMIT_EXCEEDED": 429,
    "NOT_FOUND": 404,
    "CONFLICT": 409,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "UNAVAILABLE": 503,
    "NOT_LEADER": 503,
    "TIMEOUT": 504,
}


def sd_targets(services: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Prometheus HTTP SD groups: exactly the passing instances."""
    groups: list[dict[str, Any]] = []
    for svc in services:
        name = svc["service"]["name"]
        for inst in svc["instances"]:
            if inst["status"] != "passing":
                continue
            host = inst["address"]
            target = f"[{host}]:{inst['port']}" if ":" in host else f"{host}:{inst['port']}"
            labels = {
                "__meta_regctl_service": name,
                "__meta_regctl_instance": inst["id"],
                "__meta_regctl_tags": "," + ",".join(inst["tags"]) + "," if inst["tags"] else "",
            }
            for key, value in inst["meta"].items():
                # Prometheus label names allow [a-zA-Z0-9_] only.
                safe = "".join(c if c.isalnum() or c == "_" else "_" for c in key)
                labels[f"__meta_regctl_meta_{safe}"] = value
            groups.append({"targets": [target], "labels": labels})
    return groups


class HTTPServer:
    def __init__(
        self,
        metrics: NodeMetrics,
        refresh: Callable[[], None],
        readiness: Callable[[], tuple[bool, dict[str, Any]]],
        handle: Handle | None = None,
        acl: AclService | None = None,
    ) -> None:
        self._metrics = metrics
        self._refresh = refresh
        self._readiness = readiness
        self._handle = handle
        #: With ACLs on, the JSON endpoints need a token too (``Authorization: Bearer SECRET``).
        self._acl = acl
        self._runner: web.AppRunner | None = None
        self.app = web.Application()
        self.app.router.add_get("/metrics", self._get_metrics)
        self.app.router.add_get("/healthz", self._get_healthz)
        self.app.router.add_get("/readyz", self._get_readyz)
        self.app.router.add_get("/v1/status", self._get_status)
        self.app.router.add_get("/v1/services", self._get_services)
        self.app.router.add_get("/v1/services/{name}", self._get_service)
        self.app.router.add_get("/v1/sd", self._get_sd)

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

    async def _call(self, request: web.Request, op: str, args: dict[str, Any],
                    shape: Callable[[Any], Any] = lambda body: body) -> web.Response:
        if self._handle is None:
            return web.json_response({"code": "UNAVAILABLE", "message": "starting"}, status=503)
        consistency = request.query.get("consistency")
        if consistency is not None and op != "status":
            args = {**args, "consistency": consistency}
        acl = self._acl
        principal = ""
        if acl is not None:
            auth = request.headers.get("Authorization", "")
            secret = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
            principal = hash_secret(secret) if secret else ""
        try:
            if acl is not None:
                await acl.before(op, args, principal)
            revision, body = await self._handle(op, args)
            if acl is not None:
                body = acl.filter_result(op, body, principal)
        except RegistryError as err:
            if acl is not None and isinstance(err, (Unauthenticated, PermissionDenied)):
                acl.denied(op, args, principal, request.remote or "unknown", err)
            return web.json_response(error_to_wire(err), status=HTTP_STATUS_BY_CODE.get(err.code, 500))
        return web.json_response(shape(body), headers={"X-Regctl-Revision": str(revision)})

    async def _get_status(self, request: web.Request) -> web.Response:
        return await self._call(request, "status", {})

    async def _get_services(self, request: web.Request) -> web.Response:
        return await self._call(request, "service_list", {})

    async def _get_service(self, request: web.Request) -> web.Response:
        return await self._call(request, "service_get", {"name": request.match_info["name"]})

    async def _get_sd(self, request: web.Request) -> web.Response:
        return await self._call(request, "service_dump", {}, sd_targets)

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True, ssl_context=ssl_context)
        await site.start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
