"""Failpoints: faults a test turns on to prove that a checker can fail (etcd's gofail, in small).

They are read once, at the edge (``regctl server`` reads ``REGCTL_FAILPOINTS``),
into one frozen value passed down in ``NodeConfig``; nothing below the CLI
reads the environment.  Only whoever starts the node process sets them, and
a node with any on logs a warning at start and lists them in its status
(``regctl status -o json``: ``failpoints``), so one cannot go unnoticed.
They do not need ``--dev``: jepsen-lite runs them on network namespaces,
where ``--dev`` (loopback only) cannot go.

``REGCTL_FAILPOINTS`` is a comma-separated list of names:

* ``unsafe-local-reads``: serve linearizable reads from local state without
  the read barrier (stale reads), so jepsen-lite can show its linearizability
  checker catch them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Final

from registry.errors import InvalidArgument

__all__ = ["FAILPOINTS_ENV", "Failpoints"]

FAILPOINTS_ENV: Final = "REGCTL_FAILPOINTS"


@dataclass(frozen=True, slots=True)
class Failpoints:
    unsafe_local_reads: bool = False

    @classmethod
    def parse(cls, text: str) -> Failpoints:
        """Parse ``REGCTL_FAILPOINTS``; an unknown name is an error, never ignored."""
        known = {f.name.replace("_", "-"): f.name for f in dataclasses.fields(cls)}
        on: dict[str, bool] = {}
        for item in (part.strip() for part in text.split(",")):
            if not item:
                continue
            if item not in known:
                raise InvalidArgument(
                    f"unknown failpoint {item!r} in {FAILPOINTS_ENV} (known: {', '.join(sorted(known))})")
            on[known[item]] = True
        return cls(**on)

    @property
    def active(self) -> list[str]:
        return [f.name.replace("_", "-") for f in dataclasses.fields(self) if getattr(self, f.name)]
