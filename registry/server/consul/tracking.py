"""A query's index: the revision of the last change to *its* answer.  Pure, no I/O.

Consul's ``X-Consul-Index`` should move only when the answer moves (Consul
itself moves it for any change to the table behind a query: consul #1244,
#3890).  The records left in an answer carry their own ``mod_revision``,
but a change that takes a record *out* of an answer (a delete, a status
change that fails ``?passing``, a tag change that fails ``?tag=``) leaves
no trace in the state.  Two pieces close that gap:

* ``ChangeTracker`` watches applied events and remembers, per service, the
  last revision at which one of its instances was changed or removed, and
  the last revision at which any key was deleted.  An answer's *candidate*
  index is the highest of its records' mod revisions and those marks: never
  below the true last change, sometimes above it (a status flip moves the
  mark for every query on the service).
* ``AnswerMemo`` remembers, per query, a digest of the answer last served
  and its index.  An answer equal to the remembered one keeps the old index,
  so a spurious candidate never wakes a waiting client; a different answer
  gets the candidate, and never an index below the previous one.

Both are per node and start empty: after a restart, an answer whose last
change was a removal before the restart may report a lower index than it
did (Consul's clients treat an index that goes back as a reset).  Memory is
bounded: past ``services_tracked_max`` the tracker forgets its marks and
raises one floor for all; past ``answers_max`` the memo forgets its oldest.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["ANSWERS_MAX", "AnswerMemo", "ChangeTracker", "NOTES_MAX", "SERVICES_TRACKED_MAX", "candidate_index"]

#: Services with a removal mark: twice model.SERVICES_MAX, so deleted services fit too before a reset.
SERVICES_TRACKED_MAX: Final = 200_000
#: Remembered answers (one per distinct query): 10k digests of 16 bytes plus keys, about 2 MiB.
ANSWERS_MAX: Final = 10_000
#: Remembered status notes (one per instance whose status changed): bounded like the instances.
NOTES_MAX: Final = 1_000_000

Event = dict[str, Any]


class ChangeTracker:
    """Removal marks from applied events, and the status notes the state does not keep."""

    def __init__(self, revision: int = 0, services_tracked_max: int = SERVICES_TRACKED_MAX,
                 notes_max: int = NOTES_MAX) -> None:
        #: Highest revision observed: answers read from a state ahead of it may miss a mark.
        self.revision = revision
        self._services_max = services_tracked_max
        self._notes_max = notes_max
        self._service_marks: dict[str, int] = {}
        #: Applies to every service: raised when the marks were forgotten, and by a restore.
        self._service_floor = 0
        #: Highest mark of any service (catalog-wide queries).
        self._any_service_mark = 0
        self._key_mark = 0
        self._notes: dict[tuple[str, str], str] = {}

    def observe(self, revision: int, events: Iterable[Event]) -> None:
        """An applied batch up to ``revision``, in order."""
        for event in events:
            kind = event.get("kind")
            rev = event["revision"]
            if kind in ("instance", "service"):
                name = event["service"]
                if kind == "instance":
                    self._note(event)
                if event.get("before") is not None:
                    self._mark_service(name, rev)
            elif kind == "key" and event.get("after") is None:
                self._key_mark = max(self._key_mark, rev)
        self.revision = max(self.revision, revision)

    def _mark_service(self, name: str, rev: int) -> None:
        marks = self._service_marks
        if name not in marks and len(marks) >= self._services_max:
            # Forget every mark but keep their effect: one floor for all, conservative.
            self._service_floor = max(self._service_floor, max(marks.values(), default=0))
            marks.clear()
        marks[name] = rev
        self._any_service_mark = max(self._any_service_mark, rev)

    def _note(self, event: Event) -> None:
        after = event.get("after")
        key = (event["service"], event["id"])
        if after is None:
            self._notes.pop(key, None)
        elif event.get("type") == "status":
            if key not in self._notes and len(self._notes) >= self._notes_max:
                self._notes.clear()
            self._notes[key] = str(event.get("note") or "")
        elif event.get("before") is None:
            self._notes.pop(key, None)

    def restored(self, revision: int) -> None:
        """The state was replaced by a snapshot at ``revision``: any answer may have changed there."""
        self._service_marks.clear()
        self._service_floor = max(self._service_floor, revision)
        self._any_service_mark = max(self._any_service_mark, revision)
        self._key_mark = max(self._key_mark, revision)
        self._notes.clear()
        self.revision = max(self.revision, revision)

    def service_mark(self, name: str) -> int:
        return max(self._service_floor, self._service_marks.get(name, 0))

    @property
    def any_service_mark(self) -> int:
        return max(self._service_floor, self._any_service_mark)

    @property
    def key_mark(self) -> int:
        return self._key_mark

    def note(self, service: str, instance_id: str) -> str:
        return self._notes.get((service, instance_id), "")

    @property
    def notes(self) -> dict[tuple[str, str], str]:
        return self._notes


def candidate_index(record_revisions: Iterable[int], mark: int, state_revision: int, tracked_revision: int) -> int:
    """The highest of the answer's record revisions and the removal mark, at least 1.

    If the state read is ahead of what the tracker observed, a removal in
    between may be missing from ``mark``: the state's revision is then the
    only safe answer.
    """
    index = max(mark, max(record_revisions, default=0), 1)
    if state_revision > tracked_revision:
        index = max(index, state_revision)
    return index


@dataclass(slots=True)
class _Served:
    digest: bytes
    index: int


class AnswerMemo:
    """Per query: the digest of the answer last served and its index (LRU, bounded)."""

    def __init__(self, answers_max: int = ANSWERS_MAX) -> None:
        self._max = answers_max
        self._served: OrderedDict[str, _Served] = OrderedDict()

    def __len__(self) -> int:
        return len(self._served)

    def settle(self, query: str, digest: bytes, candidate: int) -> int:
        """The index to serve for ``query``'s answer with ``digest``, given its candidate index."""
        served = self._served.get(query)
        if served is not None:
            self._served.move_to_end(query)
            if served.digest == digest:
                return served.index
            # Changed since: strictly after the last index served, so a waiting client wakes.
            served.index = max(candidate, served.index + 1)
            served.digest = digest
            return served.index
        self._served[query] = _Served(digest, candidate)
        if len(self._served) > self._max:
            self._served.popitem(last=False)
        return candidate
