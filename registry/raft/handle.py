"""The narrow surface the rest of the node sees of Raft (hashicorp/raft's ``api.go`` shape).

Only ``registry/raft/`` knows pysyncobj; everything above it types against
``RaftHandle``, so pysyncobj's privates and threading stay behind this line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["RaftHandle"]


class RaftHandle(Protocol):
    def submit(self, batch: bytes, done: Callable[[Any, int], None]) -> None:
        """Propose one batch; ``done(outcomes, fail_reason)`` runs in the Raft thread."""

    def is_leader(self) -> bool: ...

    def term(self) -> int: ...

    def stop(self) -> None: ...
