"""The leader's policy for AppendEntries rounds that would carry only a new commit index (pure)."""

from __future__ import annotations

__all__ = ["CommitHold", "commit_round_action"]


def commit_round_action(*, wanted: bool, due: float | None, now: float, delay_s: float,
                        only_commit_index: bool) -> tuple[bool, float | None]:
    """Whether the leader sends an AppendEntries round now, and until when it holds one back.

    ``wanted``: pysyncobj asked for a round during this tick; ``due``: the
    deadline of a round held back earlier (None: none held);
    ``only_commit_index``: a round now would carry nothing but the commit
    index (no entries for any follower, no heartbeat due).  Returns (send
    now, the new deadline).  A held round keeps its first deadline, so a
    stream of commits cannot postpone it forever.
    """
    if wanted and only_commit_index and delay_s > 0:
        if due is None:
            return False, now + delay_s
        wanted = False
    if wanted:
        return True, None
    if due is None:
        return False, None
    if now >= due:
        return True, None
    return False, due


class CommitHold:
    """The leader's policy for rounds that would carry only a new commit index (pure: callers pass the time).

    Holding such a round pays off only if an entry follows within
    ``delay_s`` (a client writing in a loop); for writes that arrive further
    apart (paced writers, a watch feed) it would only delay every follower.
    So a round is held only while the last entry came within ``delay_s`` of
    the commit before it: one miss turns holding off, one quick entry on.
    """

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        #: Deadline of the round held now, None if none is.
        self.due: float | None = None
        #: When the oldest commit index not yet sent was first wanted.
        self._commit_since: float | None = None
        self._entry_follows = True

    def decide(self, now: float, wanted: bool, only_commit_index: bool) -> bool:
        """Whether to send a round now; ``wanted``: asked for in this tick, ``only_commit_index``: see below.

        ``only_commit_index``: a round now would carry no entries to any
        follower and no heartbeat is due.
        """
        if wanted:
            if only_commit_index:
                if self._commit_since is None:
                    self._commit_since = now
            elif self._commit_since is not None:
                # This round carries entries (or a heartbeat) and the commit index with them.
                self._entry_follows = now - self._commit_since < self.delay_s
                self._commit_since = None
        send, self.due = commit_round_action(
            wanted=wanted, due=self.due, now=now, delay_s=self.delay_s,
            only_commit_index=only_commit_index and self._entry_follows)
        return send

    def reset(self) -> None:
        """Forget everything (the node stopped leading)."""
        self.due = None
        self._commit_since = None
        self._entry_follows = True
