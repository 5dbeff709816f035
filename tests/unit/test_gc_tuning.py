"""The node's collector settings: frozen objects are skipped, and cyclic garbage is still reclaimed."""

from __future__ import annotations

import asyncio
import gc
import weakref

from registry.server.gc_tuning import GcSettings, GcTuner


class Node:
    """Something that can sit in a reference cycle (a protocol and its transport, say)."""

    def __init__(self) -> None:
        self.other: Node | None = None


def test_tuner_freezes_then_reclaims_cycles_and_restores_the_defaults() -> None:
    before = gc.get_threshold()

    async def run() -> tuple[bool, bool, int, tuple[int, int, int]]:
        tuner = GcTuner(GcSettings(thresholds=(5_000, 15, 25), freeze_every_s=0.05, reclaim_every_s=0.3))
        tuner.start(asyncio.get_running_loop())
        a, b = Node(), Node()
        a.other, b.other = b, a
        ref = weakref.ref(a)
        await asyncio.sleep(0.12)  # a freeze: the cycle is in the permanent generation now
        frozen = gc.get_freeze_count() > 0
        during = gc.get_threshold()
        del a, b
        gc.collect()  # an ordinary full collection does not look at frozen objects
        kept_while_frozen = ref() is not None
        for _ in range(100):  # the reclaim (unfreeze + collect) frees it
            if ref() is None:
                break
            await asyncio.sleep(0.02)
        tuner.stop()
        return frozen, kept_while_frozen and ref() is None, gc.get_freeze_count(), during

    frozen, reclaimed, after_stop, during = asyncio.run(run())
    assert frozen
    assert during == (5_000, 15, 25)
    assert reclaimed, "a cycle that became garbage while frozen was never reclaimed"
    assert after_stop == 0 and gc.get_threshold() == before
