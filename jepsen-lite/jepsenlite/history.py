"""Histories: what every client process asked for and what it was told.

A history is a list of events.  A client *process* does one operation at a
time: it records an ``invoke`` event, then exactly one completion for it:

* ``ok``   -- the operation happened, and ``value`` is what it returned;
* ``fail`` -- the operation definitely did not happen (the cluster refused it
  with a code that guarantees nothing was applied, e.g. ``CONFLICT``);
* ``info`` -- the outcome is unknown (timeout, connection lost, no leader):
  a write may have been applied or not, now or at any later time.

A process whose operation ended ``info`` never invokes again: the workload
continues under a fresh process id, because the old operation may still be
in flight and a process is sequential by definition (this is Jepsen's rule,
and the linearizability checker depends on it).

The nemesis writes its fault windows into the same history as ``info``
events of the process ``"nemesis"``.  Times are ``time.monotonic_ns()``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Event", "Op", "Recorder", "NEMESIS", "pair", "read_jsonl", "write_jsonl"]

#: Process name of nemesis events.
NEMESIS = "nemesis"
EVENT_TYPES = frozenset(("invoke", "ok", "fail", "info"))


@dataclass(slots=True)
class Event:
    index: int
    process: int | str
    type: str
    f: str
    key: Any
    value: Any
    time: int
    workload: str
    #: Error code of a fail/info completion (``CONFLICT``, ``TIMEOUT`` ...).
    error: str | None = None
    #: Revision the cluster reported with an ``ok`` completion.
    revision: int | None = None
    #: Anything else worth keeping (mod_revision of a read, ...).
    extra: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "index": self.index,
            "process": self.process,
            "type": self.type,
            "f": self.f,
            "key": self.key,
            "value": self.value,
            "time": self.time,
            "workload": self.workload,
        }
        if self.error is not None:
            out["error"] = self.error
        if self.revision is not None:
            out["revision"] = self.revision
        if self.extra:
            out["extra"] = self.extra
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Event:
        if obj.get("type") not in EVENT_TYPES:
            raise ValueError(f"event has no valid type: {obj!r:.200}")
        return cls(
            index=int(obj["index"]),
            process=obj["process"],
            type=obj["type"],
            f=str(obj["f"]),
            key=obj.get("key"),
            value=obj.get("value"),
            time=int(obj["time"]),
            workload=str(obj.get("workload", "")),
            error=obj.get("error"),
            revision=obj.get("revision"),
            extra=obj.get("extra"),
        )


@dataclass(frozen=True, slots=True)
class Op:
    """One invocation paired with its completion."""

    index: int
    process: int | str
    workload: str
    f: str
    key: Any
    #: What was asked (the invoke event's value).
    value: Any
    #: ``ok`` / ``fail`` / ``info``.
    type: str
    #: What came back (the completion's value; None for fail/info).
    result: Any
    invoke_time: int
    #: None when the history ended before the operation completed (same as info).
    complete_time: int | None
    error: str | None = None
    revision: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def latency_ns(self) -> int | None:
        return None if self.complete_time is None else self.complete_time - self.invoke_time


class Recorder:
    """Appends events with monotonic timestamps; one per run, shared by all processes."""

    def __init__(self, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self._clock = clock
        self.events: list[Event] = []

    def _add(self, process: int | str, type_: str, f: str, key: Any, value: Any, workload: str,
             error: str | None = None, revision: int | None = None, extra: dict[str, Any] | None = None) -> Event:
        event = Event(len(self.events), process, type_, f, key, value, self._clock(), workload, error, revision,
                      extra)
        self.events.append(event)
        return event

    def invoke(self, process: int, workload: str, f: str, key: Any, value: Any) -> Event:
        return self._add(process, "invoke", f, key, value, workload)

    def complete(self, invoked: Event, type_: str, value: Any = None, *, key: Any = None, error: str | None = None,
                 revision: int | None = None, extra: dict[str, Any] | None = None) -> Event:
        assert invoked.type == "invoke" and type_ in ("ok", "fail", "info")
        return self._add(invoked.process, type_, invoked.f, invoked.key if key is None else key, value,
                         invoked.workload, error, revision, extra)

    def nemesis(self, f: str, key: Any, value: Any) -> Event:
        return self._add(NEMESIS, "info", f, key, value, NEMESIS)


def pair(events: Iterable[Event]) -> list[Op]:
    """Pair each invoke with the next completion of the same process; nemesis events are skipped.

    An invoke left without completion becomes an ``info`` op with ``complete_time`` None.
    Raises ValueError on a malformed history (completion without invoke, two invokes in a row).
    """
    pending: dict[int | str, Event] = {}
    ops: list[Op] = []
    for event in events:
        if event.process == NEMESIS:
            continue
        if event.type == "invoke":
            if event.process in pending:
                raise ValueError(f"process {event.process} invoked twice without completing (event {event.index})")
            pending[event.process] = event
            continue
        inv = pending.pop(event.process, None)
        if inv is None:
            raise ValueError(f"completion without invoke: event {event.index} of process {event.process}")
        if inv.f != event.f:
            raise ValueError(f"completion {event.index} ({event.f}) does not match invoke {inv.index} ({inv.f})")
        ops.append(Op(inv.index, inv.process, inv.workload, inv.f, event.key if event.key is not None else inv.key,
                      inv.value, event.type, event.value if event.type == "ok" else None, inv.time, event.time,
                      event.error, event.revision, dict(event.extra or {})))
    for inv in pending.values():
        ops.append(Op(inv.index, inv.process, inv.workload, inv.f, inv.key, inv.value, "info", None, inv.time, None))
    ops.sort(key=lambda op: op.index)
    return ops


def write_jsonl(path: Path, events: Iterable[Event]) -> None:
    with open(path, "w", encoding="utf-8") as out:
        for event in events:
            out.write(json.dumps(event.to_json(), separators=(",", ":"), sort_keys=True))
            out.write("\n")


def read_jsonl(path: Path) -> list[Event]:
    events = []
    with open(path, encoding="utf-8") as src:
        for line in src:
            if line.strip():
                events.append(Event.from_json(json.loads(line)))
    return events
