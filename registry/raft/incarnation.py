"""Data-directory identity: which copy of a member's disk is speaking on its Raft address.

Why.  pysyncobj names a member by its Raft address only, and Raft's safety
rests on a member never forgetting its log or its vote.  A node started on an
empty data directory under a member's address has forgotten both: it votes
for any candidate, so a lagging node could be elected with its help and
acknowledged writes would be lost (bug 2 in jepsen-lite/README.md, found by
the ``rejoin-empty-voter`` scenario).

How.  Every data directory holds a random *incarnation* id, made when the
directory is first used and kept for its lifetime.  Every Raft message
carries the sender's address and incarnation inside the authenticated header
(``RaftCipher``).  The replicated state records the incarnation each member
joined with (``RegistryState.identity``: cluster metadata, outside the
revisioned keyspace: no revision, no events); a node refuses (drops the
connection of) any message whose sender's incarnation differs from the
recorded one.  A wiped node therefore cannot vote, acknowledge entries or
lead until an operator removes and re-adds its address
(``regctl member remove`` forgets the record; ``regctl member add`` records
the new one).

Who records.  ``regctl member add`` reads the new node's incarnation from its
API and the leader records it *before* the configuration change, so every
node that has the new configuration in its log has the record too.  Members
of a freshly bootstrapped cluster, and members added without their API
address, are recorded by the leader on first contact: until then (up to
half a second after the first election) their address is not protected.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path

from registry.errors import InvalidArgument
from registry.fsm import model

__all__ = ["INCARNATION_FILE", "IncarnationGuard", "PeerRefused", "load_or_create", "check_incarnation"]

log = logging.getLogger("registry.raft.incarnation")

INCARNATION_FILE = "incarnation"
#: An incarnation is 16 random bytes, written as 32 lowercase hex digits.
INCARNATION_BYTES = 16
#: A refused peer is logged at most once per this many seconds (it retries every connect period).
REFUSAL_LOG_EVERY_S = 10.0


class PeerRefused(ValueError):
    """A Raft message from a known address but another data directory; pysyncobj drops the connection."""


def check_incarnation(value: object) -> str:
    """``value`` if it is an incarnation id (32 lowercase hex digits), else ``InvalidArgument``."""
    if not isinstance(value, str):
        raise InvalidArgument("incarnation must be 32 lowercase hex digits")
    return model.check_incarnation("incarnation", value)


def load_or_create(data_dir: Path) -> tuple[str, bool]:
    """This data directory's incarnation, made on first use; returns (incarnation, created).

    A file that exists but does not hold an incarnation is refused rather
    than replaced: replacing it would make this node a stranger to its
    cluster, which is the operator's call (remove and re-add the member).
    """
    path = data_dir / INCARNATION_FILE
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError) as err:
        raise InvalidArgument(f"{path}: unreadable incarnation file: {err}") from None
    else:
        try:
            return check_incarnation(text), False
        except InvalidArgument:
            raise InvalidArgument(f"{path}: corrupt incarnation file (expected 32 hex digits); restore it from "
                                  "the node's backup, or wipe the data directory and re-add the member") from None
    data_dir.mkdir(parents=True, exist_ok=True)
    incarnation = secrets.token_hex(INCARNATION_BYTES)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="ascii") as f:
        f.write(incarnation + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return incarnation, True


class IncarnationGuard:
    """Decides, per received Raft message, whether its sender is the member the cluster recorded.

    ``lookup(raft_addr)`` gives the recorded incarnation or None (runs in the
    Raft thread, on the applied state).  Unrecorded senders are admitted and
    remembered in ``seen`` so that the leader can record them.
    """

    def __init__(self, lookup: Callable[[str], str | None], *,
                 clock: Callable[[], float] = time.monotonic,
                 on_refused: Callable[[str], None] | None = None) -> None:
        self._lookup = lookup
        self._clock = clock
        self._on_refused = on_refused
        #: Unrecorded sender address -> the incarnation it last spoke with.
        self.seen: dict[str, str] = {}
        self.refused = 0
        self._logged_at: dict[str, float] = {}

    def check(self, raft_addr: str, incarnation: str) -> None:
        expected = self._lookup(raft_addr)
        if expected is None:
            self.seen[raft_addr] = incarnation
            return
        if expected == incarnation:
            return
        self.refused += 1
        if self._on_refused is not None:
            self._on_refused(raft_addr)
        now = self._clock()
        last = self._logged_at.get(raft_addr)
        if last is None or now - last >= REFUSAL_LOG_EVERY_S:
            self._logged_at[raft_addr] = now
            log.error(
                "refusing Raft traffic from %s: its data directory (incarnation %s) is not the one this cluster "
                "recorded for that address (%s). A member that lost its data must not rejoin as itself: "
                "`regctl member remove %s`, then `regctl member add %s --api ...` once it runs",
                raft_addr, incarnation, expected, raft_addr, raft_addr,
            )
        raise PeerRefused(f"{raft_addr}: incarnation {incarnation}, recorded {expected}")
