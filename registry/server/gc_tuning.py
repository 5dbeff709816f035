"""Garbage-collector settings of a node process.

Why.  A node's state is millions of long-lived objects that hold no cycles
(records are dicts of str and int).  CPython's automatic collector promotes
young objects that survive a collection to the oldest generation, and once
those are a quarter of it, it scans the whole heap: tens to hundreds of
milliseconds with a large registry, in whichever thread happens to allocate
(often the Raft thread, which then misses heartbeats), every few seconds
under write load.  Measured with ``python -m bench.run`` (register at 256 in
flight, medians of 2 x 3 s on 2 cores): defaults 4.2k writes/s, p99 305 ms;
these settings 5.0k/s, p99 97 ms; the collector switched off 5.2k/s, p99
93 ms.

What.  Larger thresholds (fewer collections, and fewer short-lived objects
promoted because they happened to be alive at one), and ``gc.freeze()``
every ``freeze_every_s``: what is alive then moves to the permanent
generation, which collections never scan.  Garbage without cycles is still
freed at once by reference counting.  Cyclic garbage among frozen objects
(a closed connection's protocol and transport, say) waits for the next
reclaim, every ``reclaim_every_s``: unfreeze, one full collection, freeze
again -- one long pause per period instead of one every few seconds.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from dataclasses import dataclass

__all__ = ["GcSettings", "GcTuner"]

log = logging.getLogger("registry.gc")


@dataclass(frozen=True, slots=True)
class GcSettings:
    #: ``gc.set_threshold`` arguments (CPython's defaults are 700, 10, 10).
    thresholds: tuple[int, int, int] = (20_000, 20, 50)
    freeze_every_s: float = 5.0
    reclaim_every_s: float = 600.0


class GcTuner:
    """Applies ``GcSettings`` to this process while started; ``stop`` restores what it found."""

    def __init__(self, settings: GcSettings) -> None:
        self.settings = settings
        self._saved: tuple[int, int, int] | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_reclaim = 0.0
        #: Duration of the last reclaim's full collection (seconds), for logs and tests.
        self.last_reclaim_s: float | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._saved = gc.get_threshold()
        gc.set_threshold(*self.settings.thresholds)
        self._last_reclaim = time.monotonic()
        self._handle = loop.call_later(self.settings.freeze_every_s, self._tick)

    def _tick(self) -> None:
        now = time.monotonic()
        if now - self._last_reclaim >= self.settings.reclaim_every_s:
            self._last_reclaim = now
            gc.unfreeze()
            started = time.perf_counter()
            found = gc.collect()
            self.last_reclaim_s = time.perf_counter() - started
            log.debug("gc reclaim: %d unreachable objects, %.0f ms", found, self.last_reclaim_s * 1000)
        gc.freeze()
        assert self._loop is not None
        self._handle = self._loop.call_later(self.settings.freeze_every_s, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._saved is not None:
            gc.set_threshold(*self._saved)
            self._saved = None
        gc.unfreeze()
