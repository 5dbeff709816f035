"""A fuzz target's time budget: ``FUZZ_SECONDS`` runs it again and again, each run with a fresh seed.

Hypothesis stops after ``max_examples`` (``FUZZ_EXAMPLES``) and has no time
limit of its own, and examples per second differ 30-fold between targets
here, so a campaign of "N minutes per target" repeats each target's
hypothesis run until its budget is spent.  ``FUZZ_LOG``: a file that gets one
JSON line per target (runs, examples, seconds), for the campaign's report.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from typing import Any

__all__ = ["EXAMPLES", "SECONDS", "for_a_while"]

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
SECONDS = float(os.environ.get("FUZZ_SECONDS", "0"))
LOG = os.environ.get("FUZZ_LOG")


def for_a_while(test: Callable[..., None]) -> Callable[..., None]:
    """Wrap a ``@given`` test: run it once, or until ``FUZZ_SECONDS`` have passed (at least once)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        started = time.monotonic()
        runs = 0
        while True:
            test(*args, **kwargs)
            runs += 1
            if time.monotonic() - started >= SECONDS:
                break
        if LOG:
            with open(LOG, "a", encoding="utf-8") as f:
                f.write(json.dumps({"target": test.__name__, "runs": runs, "examples": runs * EXAMPLES,
                                    "seconds": round(time.monotonic() - started, 1)}) + "\n")

    return run
