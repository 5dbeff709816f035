"""Health checks with I/O: HTTP status, TCP connect, command exit code.

``run_check`` runs one check once, bounded by the spec's timeout, and
returns ``(ok, note)``; it never raises for a failing target (a refused
connection, a timeout, a missing command are all just "not ok", with the
reason in the note).  ``CheckLoop`` runs a check every interval, feeds the
results to a ``HealthState`` and calls back when the (rise/fall filtered)
status changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import aiohttp

from registry.agent.health import CheckSpec, HealthState

__all__ = ["run_check", "CheckLoop"]

log = logging.getLogger("registry.agent.checks")

#: Output of a command check kept for the note (the registry bounds notes at 1024 chars).
_NOTE_CHARS_MAX = 512


async def _http(spec: CheckSpec, session: aiohttp.ClientSession) -> tuple[bool, str]:
    async with session.get(spec.target, allow_redirects=False) as response:
        ok = 200 <= response.status < 300
        return ok, f"HTTP GET {spec.target}: {response.status} {response.reason or ''}".rstrip()


async def _tcp(spec: CheckSpec) -> tuple[bool, str]:
    host, port = spec.hostport
    _, writer = await asyncio.open_connection(host, port)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True, f"TCP connect {spec.target}: ok"


async def _cmd(spec: CheckSpec) -> tuple[bool, str]:
    proc = await asyncio.create_subprocess_exec(
        *spec.argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await proc.communicate()
    except asyncio.CancelledError:
        # The timeout fired: do not leave the command running.
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    text = out.decode(errors="replace").strip()[-_NOTE_CHARS_MAX:]
    return proc.returncode == 0, f"{spec.target}: exit {proc.returncode}" + (f": {text}" if text else "")


async def run_check(spec: CheckSpec, session: aiohttp.ClientSession | None = None) -> tuple[bool, str]:
    """Run ``spec`` once within its timeout; ``(ok, note)``."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(spec.timeout_s):
            if spec.kind == "http":
                if session is None:
                    async with aiohttp.ClientSession() as own:
                        return await _http(spec, own)
                return await _http(spec, session)
            if spec.kind == "tcp":
                return await _tcp(spec)
            return await _cmd(spec)
    except TimeoutError:
        return False, f"{spec.describe()}: timed out after {time.monotonic() - started:.2f}s"
    except (OSError, aiohttp.ClientError) as err:
        return False, f"{spec.describe()}: {type(err).__name__}: {err}"


StatusCallback = Callable[[str, str], Awaitable[None]]


class CheckLoop:
    """Runs one check every interval; calls ``on_change(status, note)`` when the filtered status changes."""

    def __init__(self, spec: CheckSpec, on_change: StatusCallback, session: aiohttp.ClientSession | None = None,
                 label: str = "") -> None:
        self.spec = spec
        self.state = HealthState(spec.rise, spec.fall)
        self.last_note = ""
        self.last_ok: bool | None = None
        self._on_change = on_change
        self._session = session
        self._label = label or spec.describe()

    async def check_once(self) -> str | None:
        """Run the check once and feed the result; the new status if it changed."""
        ok, note = await run_check(self.spec, self._session)
        self.last_ok, self.last_note = ok, note
        changed = self.state.observe(ok)
        if changed is not None:
            log.info("check %s: %s (%s)", self._label, changed, note)
            await self._on_change(changed, note)
        return changed

    async def run(self, first_delay_s: float = 0.0) -> None:
        """Check forever, one run every interval (measured start to start), the first after ``first_delay_s``."""
        loop = asyncio.get_running_loop()
        await asyncio.sleep(first_delay_s)
        next_at = loop.time()
        while True:
            next_at += self.spec.interval_s
            await self.check_once()
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            if loop.time() > next_at + self.spec.interval_s:
                next_at = loop.time()  # fell behind (a paused process): do not burst
