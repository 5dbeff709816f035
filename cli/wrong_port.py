"""Where the API is, when the user pointed ``--endpoints`` at a node's HTTP port.

The client only says what answered (``registry.client.wrong_port``); here the
CLI asks that HTTP port for the node's status, which names the node's API
address, so the error can say exactly what to use instead.
"""

from __future__ import annotations

import asyncio

import aiohttp

from registry.client import ConnectionFailed

__all__ = ["api_hint"]

#: How long the CLI waits for a node's HTTP status before leaving the hint out.
HTTP_STATUS_TIMEOUT_S = 1.0


async def _api_of(endpoint: str) -> str | None:
    timeout = aiohttp.ClientTimeout(total=HTTP_STATUS_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(f"http://{endpoint}/v1/status") as response:
            body = await response.json()
    api = body.get("api") if isinstance(body, dict) else None
    return str(api) if api else None


def api_hint(err: ConnectionFailed) -> str | None:
    """"use the API at A instead of H" for each HTTP port in ``err`` whose node says where its API is."""
    parts = []
    for wrong in err.wrong_ports:
        if wrong.answered != "HTTP":
            continue
        try:
            api = asyncio.run(_api_of(wrong.endpoint))
        except (aiohttp.ClientError, TimeoutError, ValueError, OSError):
            api = None
        if api is not None:
            parts.append(f"the node whose HTTP port is {wrong.endpoint} serves its API at {api}")
    return "; ".join(parts) or None
