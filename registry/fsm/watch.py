"""Watch hub: bounded history and fan-out of applied events to watchers.

Theory of operation
-------------------
The node hands every applied batch to ``WatchHub.publish`` on its event loop,
in revision order.  The hub keeps a bounded history (by event count and by
bytes) so a watcher can start, or resume after a reconnect, from an older
revision; below the history's floor it gets an explicit resync instead.

Watchers with the same selector (one service, a name prefix, everything)
share one group: each published batch is encoded once (each event once),
filtered once per *distinct* selector and cut into ``Chunk``s, whose wire
bytes (a stream item body) are shared by every watcher of the group.  So the
per-watcher cost of an event is a reference, not an encode: a watcher that
keeps up hands the chunk straight to its ``direct`` sender (the shell writes
the shared bytes behind a per-stream frame header), any other queues it.

Each watcher has a bounded queue (events and bytes).  ``publish`` never
waits for a watcher: a watcher whose queue would overflow drops it and is
flagged for resync (reason ``slow``).  The shell then sends it a consistent snapshot at some
revision R read from the state and continues from R + 1; events at or below R
that still arrive are skipped.  So a slow watcher costs bounded memory and
never blocks apply or other watchers.

Pure: no I/O, no clock, no asyncio; ``notify`` callbacks wake the shell.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from registry.config import HubLimits
from registry.errors import BadRequest, InvalidArgument

__all__ = ["CHUNK_BYTES_MAX", "Chunk", "Selector", "Watcher", "WatchHub", "HubLimits", "event_matches", "make_chunks",
           "parse_selector"]

Event = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Selector:
    #: "service" (exactly one service), "prefix" (service names and keys with
    #: this prefix), or "all" (every event, leases and locks too).
    kind: str
    value: str = ""


SELECTOR_VALUE_CHARS_MAX = 512


def parse_selector(args: dict[str, Any]) -> Selector:
    chosen = [k for k in ("service", "prefix", "all") if args.get(k) not in (None, False)]
    if len(chosen) != 1:
        raise BadRequest("a watch needs exactly one of 'service', 'prefix' or 'all'")
    kind = chosen[0]
    if kind == "all":
        if args["all"] is not True:
            raise BadRequest("field 'all' must be true")
        return Selector("all")
    value = args[kind]
    if not isinstance(value, str):
        raise BadRequest(f"field {kind!r} must be a string")
    if len(value) > SELECTOR_VALUE_CHARS_MAX or (kind == "service" and not value):
        raise InvalidArgument(f"{kind} must be 1..{SELECTOR_VALUE_CHARS_MAX} characters")
    return Selector(kind, value)


def event_matches(selector: Selector, event: Event) -> bool:
    kind = selector.kind
    if kind == "all":
        return True
    event_kind = event.get("kind")
    if event_kind in ("service", "instance"):
        service = event.get("service") or ""
        return service == selector.value if kind == "service" else service.startswith(selector.value)
    if kind == "prefix" and event_kind in ("key", "lock"):
        return str(event.get("id") or "").startswith(selector.value)
    return False


#: Encoded event bytes per stream message (soft: one revision is split only
#: when it alone is bigger, into ``partial`` pieces): half the default 1 MiB
#: frame, so a message always fits a frame with room to spare.
CHUNK_BYTES_MAX = 512 << 10

_EVENTS_ITEM_HEAD = b"\x82\xa4type\xa6events\xa6events"  # {"type": "events", "events": <array>}
_PARTIAL_ITEM_HEAD = b"\x83\xa7partial\xc3\xa4type\xa6events\xa6events"


def _array_head(count: int) -> bytes:
    if count < 16:
        return bytes((0x90 | count,))
    if count < 1 << 16:
        return b"\xdc" + count.to_bytes(2, "big")
    return b"\xdd" + count.to_bytes(4, "big")


def encode_events(events: list[Event], pack: Callable[[Any], bytes] | None = None) -> list[bytes]:
    """Each event's msgpack.  ``pack``: a reused ``Packer(use_bin_type=True).pack``, owned by one thread.

    ``msgpack.packb`` builds a new Packer (and its buffer) per call: about 1.2 us
    of the 3.2 us an update event (before and after records) takes to encode.
    """
    if pack is None:
        return [msgpack.packb(e, use_bin_type=True) for e in events]
    return [pack(e) for e in events]


class Chunk:
    """A run of whole revisions' events (or one piece of a revision too big for a message),
    encoded once as a stream item body and shared by every watcher that needs it.

    ``body`` is the msgpack of ``{"type": "events", "events": [...]}`` (plus
    ``"partial": true`` for a piece), built by concatenating the events'
    encodings: the fan-out writes these same bytes to every watcher of a
    selector instead of encoding per watcher.
    """

    __slots__ = ("body", "events", "first", "last", "partial")

    def __init__(self, events: list[Event], encoded: list[bytes] | None = None, partial: bool = False) -> None:
        self.events = events
        self.first: int = events[0]["revision"]
        self.last: int = events[-1]["revision"]
        self.partial = partial
        parts = encoded if encoded is not None else encode_events(events)
        head = _PARTIAL_ITEM_HEAD if partial else _EVENTS_ITEM_HEAD
        self.body: bytes = b"".join((head, _array_head(len(events)), *parts))

    @property
    def count(self) -> int:
        return len(self.events)

    def after(self, revision: int) -> Chunk | None:
        """This chunk without its events at or below ``revision`` (None if nothing is left)."""
        if self.first > revision:
            return self
        if self.last <= revision:
            return None
        return Chunk([e for e in self.events if e["revision"] > revision], partial=self.partial)


def make_chunks(events: list[Event], encoded: list[bytes] | None = None,
                bytes_max: int = CHUNK_BYTES_MAX) -> list[Chunk]:
    """Chunks of whole revisions of at most about ``bytes_max`` encoded bytes each.

    A revision bigger than ``bytes_max`` on its own is split into pieces, all
    but the last marked ``partial``: the client holds pieces back until the
    revision is complete, so a resume never sees half a revision.
    """
    if not events:
        return []
    if encoded is None:
        encoded = encode_events(events)
    chunks: list[Chunk] = []
    start = 0  # first event of the chunk being built
    size = 0
    i = 0
    n = len(events)
    while i < n:
        revision = events[i]["revision"]
        j = i + 1
        group_size = len(encoded[i])
        while j < n and events[j]["revision"] == revision:
            group_size += len(encoded[j])
            j += 1
        if i > start and size + group_size > bytes_max:
            chunks.append(Chunk(events[start:i], encoded[start:i]))
            start, size = i, 0
        if group_size > bytes_max and j - i > 1:
            # One revision alone is too big for a message: pieces.
            piece_start, piece_size = i, 0
            for k in range(i, j):
                if k > piece_start and piece_size + len(encoded[k]) > bytes_max:
                    chunks.append(Chunk(events[piece_start:k], encoded[piece_start:k], partial=True))
                    piece_start, piece_size = k, 0
                piece_size += len(encoded[k])
            chunks.append(Chunk(events[piece_start:j], encoded[piece_start:j]))
            start, size = j, 0
        else:
            size += group_size
        i = j
    if start < n:
        chunks.append(Chunk(events[start:], encoded[start:]))
    return chunks


def selected_chunks(selector: Selector, events: list[Event], encoded: list[bytes]) -> list[Chunk]:
    """The chunks of the events ``selector`` matches, joined from their existing encodings."""
    if selector.kind == "all":
        return make_chunks(events, encoded)
    picked = [i for i, e in enumerate(events) if event_matches(selector, e)]
    return make_chunks([events[i] for i in picked], [encoded[i] for i in picked])


#: Sends encoded chunk bodies to the client right away (all of them), or returns False having
#: sent nothing, to have them queued instead.
DirectSend = Callable[[list[bytes]], bool]


class Watcher:
    __slots__ = ("_bytes", "_bytes_max", "_chunks", "_notify", "_pending", "_queue_max", "direct", "dropped",
                 "next_revision", "resync_reason", "selector")

    def __init__(self, selector: Selector, next_revision: int, queue_max: int, notify: Callable[[], None],
                 bytes_max: int = 1 << 62) -> None:
        self.selector = selector
        #: Events below this revision are not for this watcher (already covered).
        self.next_revision = next_revision
        self.resync_reason: str | None = None
        #: Queued chunks (shared with the other watchers of the selector), with
        #: their event count and encoded bytes: both are bounded.
        self._chunks: deque[Chunk] = deque()
        self._pending = 0
        self._bytes = 0
        self._queue_max = queue_max
        self._bytes_max = bytes_max
        self._notify = notify
        #: Set by the shell while the stream can take bytes at once: a watcher
        #: with nothing queued then sends new chunks from ``publish`` itself,
        #: with no wake-up of its task (the common case of a watcher keeping up).
        self.direct: DirectSend | None = None
        #: Events dropped because the watcher was too slow (for metrics).
        self.dropped = 0

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def pending_bytes(self) -> int:
        return self._bytes

    def push(self, events: list[Event]) -> bool:
        """Queue the events this watcher still needs; True if that made it overflow (now "slow")."""
        return self.push_chunks(make_chunks(events)) if events else False

    def push_chunks(self, chunks: list[Chunk]) -> bool:
        """Deliver or queue ``chunks`` (whole revisions, in order); True if the queue overflowed."""
        if self.resync_reason is not None or not chunks:
            return False  # a snapshot will cover these
        floor = self.next_revision - 1
        if chunks[0].first <= floor:
            chunks = [c for c in (c.after(floor) for c in chunks) if c is not None]
            if not chunks:
                return False
        if not self._chunks and self.direct is not None and self.direct([c.body for c in chunks]):
            self.next_revision = chunks[-1].last + 1
            return False
        count = 0
        size = 0
        for chunk in chunks:
            count += len(chunk.events)
            size += len(chunk.body)
        if self._pending + count > self._queue_max or self._bytes + size > self._bytes_max:
            self.dropped += self._pending + count
            self._clear()
            self.resync_reason = "slow"
            self._notify()
            return True
        self._chunks.extend(chunks)
        self._pending += count
        self._bytes += size
        self._notify()
        return False

    def _clear(self) -> None:
        self._chunks.clear()
        self._pending = 0
        self._bytes = 0

    def mark_resync(self, reason: str) -> None:
        self._clear()
        self.resync_reason = reason
        self._notify()

    def resynced(self, revision: int) -> None:
        """The shell sent a snapshot at ``revision``: continue after it."""
        self.resync_reason = None
        self.next_revision = revision + 1
        chunks = self._chunks
        while chunks and chunks[0].first <= revision:
            head = chunks.popleft()
            self._pending -= len(head.events)
            self._bytes -= len(head.body)
            rest = head.after(revision)
            if rest is not None:
                chunks.appendleft(rest)
                self._pending += len(rest.events)
                self._bytes += len(rest.body)
                break

    def _popleft(self) -> Chunk:
        chunk = self._chunks.popleft()
        self._pending -= len(chunk.events)
        self._bytes -= len(chunk.body)
        return chunk

    def take_chunks(self, bytes_max: int = CHUNK_BYTES_MAX) -> list[Chunk]:
        """Queued chunks up to about ``bytes_max`` bytes; never ends inside a revision."""
        out: list[Chunk] = []
        size = 0
        chunks = self._chunks
        while chunks and (size < bytes_max or out[-1].partial):
            chunk = self._popleft()
            out.append(chunk)
            size += len(chunk.body)
        if out:
            self.next_revision = max(self.next_revision, out[-1].last + 1)
        return out

    def take(self, count_max: int) -> list[Event]:
        """Up to ``count_max`` queued events, extended to whole revisions.

        A revision's events are never split across two takes: a client resumes
        from the last revision it received + 1, so a revision cut in half at a
        message boundary would lose its other half on a reconnect.
        """
        out: list[Event] = []
        chunks = self._chunks
        while chunks and (len(out) < count_max or chunks[0].first == out[-1]["revision"]):
            chunk = self._popleft()
            events = chunk.events
            room = max(count_max - len(out), 1)
            if len(events) <= room or events[room - 1]["revision"] == events[-1]["revision"]:
                out.extend(events)
                continue
            # Cut after the revision that reaches the budget; the rest goes back.
            cut = room
            while cut < len(events) and events[cut]["revision"] == events[cut - 1]["revision"]:
                cut += 1
            out.extend(events[:cut])
            rest = Chunk(events[cut:], partial=chunk.partial)
            chunks.appendleft(rest)
            self._pending += len(rest.events)
            self._bytes += len(rest.body)
            break
        if out:
            self.next_revision = max(self.next_revision, out[-1]["revision"] + 1)
        return out


#: What the history's byte budget charges per event kept unencoded, on top of its share of
#: the Raft entry bytes (see ``WatchHub.publish``): the event map's own keys and revision.
EVENT_CHARGE_BYTES: Final = 64


class _Published:
    """One published batch kept in the history: its events, their encodings, and the watch
    messages already built from them for watchers that started behind the head.

    ``encoded`` is None while no watch has needed the batch (``WatchHub.publish`` with a size
    hint and no watch open); ``size`` is then the charge the hint gave it.

    ``chunks`` is filled by ``subscribe`` only, one list per selector, on first use: after an
    overload a thousand watches of one selector resume from about the same revision, and
    filtering and joining each batch once per resumed watch kept a node at a full core for
    8 s after the load stopped.  ``size`` is the encodings' bytes (what the history's byte
    limit counts), ``cached_size`` the cached messages' bytes (bounded separately, see
    ``WatchHub.subscribe``).
    """

    __slots__ = ("cached_size", "chunks", "encoded", "events", "last_revision", "size")

    def __init__(self, events: list[Event], encoded: list[bytes] | None, size: int) -> None:
        self.last_revision: int = events[-1]["revision"]
        self.events = events
        self.encoded = encoded
        self.size = size
        self.chunks: dict[Selector, list[Chunk]] = {}
        self.cached_size = 0

    def encode(self, pack: Callable[[Any], bytes]) -> list[bytes]:
        """Encode the events (once); ``size`` becomes their encoded bytes."""
        if self.encoded is None:
            self.encoded = encode_events(self.events, pack)
            self.size = sum(map(len, self.encoded))
        return self.encoded


class WatchHub:
    def __init__(self, revision: int, limits: HubLimits | None = None) -> None:
        self.limits = limits or HubLimits()
        self.limits.validate()
        #: Highest revision published.
        self.revision = revision
        #: Highest revision whose events are *not* all in history: a watch
        #: starting at or below it needs a resync.
        self.floor = revision
        #: The published batches, oldest first.  The encodings are kept so that a watcher
        #: starting in the past gets its backlog from the same bytes as everyone else: encoding
        #: it per subscriber made 1000 watchers that subscribed behind the head cost the node
        #: minutes of CPU.
        self._history: deque[_Published] = deque()
        self._history_events = 0
        self._history_bytes = 0
        #: Bytes of the resumed-watch messages cached in the history (at most history_bytes_max).
        self._cached_bytes = 0
        self._groups: dict[Selector, set[Watcher]] = {}
        self.watchers = 0
        self.events_published = 0
        #: Events written to watchers straight from ``publish`` (the shell counts the rest).
        self.events_sent_direct = 0
        #: Events the hub has encoded: each at most once, at publish while a watch is open, else
        #: when a watch first resumes from its batch.  Tests read it to prove encodings are shared.
        self.events_encoded = 0
        #: Times a batch was filtered and joined into messages for one selector (at fan-out, and
        #: for a resuming watch when no cached build of that batch for its selector is kept).
        self.selections_built = 0
        #: Watchers flagged for resync by the hub, by reason (compacted, slow,
        #: restore), counted when flagged: a watcher stuck behind a full socket
        #: may never get to send its snapshot, but it was dropped all the same.
        self.resyncs: dict[str, int] = {}
        #: Encodes published events; the hub is used from one thread (the node's event loop).
        self._pack = msgpack.Packer(use_bin_type=True).pack

    def _encoded(self, published: _Published) -> list[bytes]:
        """The batch's encodings, made now if it was kept unencoded."""
        if published.encoded is None:
            self.events_encoded += len(published.events)
        return published.encode(self._pack)

    def _selected(self, selector: Selector, events: list[Event], encoded: list[bytes]) -> list[Chunk]:
        self.selections_built += 1
        return selected_chunks(selector, events, encoded)

    def _flagged(self, reason: str, count: int = 1) -> None:
        self.resyncs[reason] = self.resyncs.get(reason, 0) + count

    @property
    def distinct(self) -> int:
        return len(self._groups)

    def publish(self, revision: int, events: list[Event], size_hint: int | None = None) -> None:
        """Applied events up to ``revision``: to the history, and to every watcher they match.

        ``size_hint``: bytes of the Raft entries the events came from.  With it, and no watch
        open on this node, nothing needs the events' bytes yet: they are kept unencoded until
        a watch resuming from the history needs them (encoding events nobody watched was a
        sixth of a follower's CPU per write), and the byte budget charges the hint plus
        ``EVENT_CHARGE_BYTES`` per event until then, the encoded size after.  That still
        bounds what the history keeps beyond the live state: an event's new record was built
        from its command (charged with its entry), and an old record it keeps (a put's
        ``before``, a delete's) was either an earlier event's new record or part of the state
        when the history's oldest event was published.
        """
        if events and events[0]["revision"] <= self.revision:
            fresh = [e for e in events if e["revision"] > self.revision]
        else:
            fresh = events
        if revision <= self.revision and not fresh:
            return
        if fresh:
            published = _Published(fresh, None, EVENT_CHARGE_BYTES * len(fresh) + (size_hint or 0))
            if size_hint is None or self._groups:
                # Each event is encoded once; a selector's chunks are joined from
                # these bytes, and each chunk is shared by every watcher of it.
                self._encoded(published)
            self._history.append(published)
            self._history_events += len(fresh)
            self._history_bytes += published.size
            self._trim()
            self._fan_out(fresh, published.encoded)
            self.events_published += len(fresh)
        self.revision = max(self.revision, revision, fresh[-1]["revision"] if fresh else 0)

    def _fan_out(self, fresh: list[Event], encoded: list[bytes] | None) -> None:
        """Hand freshly published events to every watcher they match."""
        if encoded is None:
            return  # kept unencoded: no watch is open
        for selector, group in self._groups.items():
            chunks = self._selected(selector, fresh, encoded)
            if not chunks:
                continue
            # The common case inlined (this loop runs once per watcher per batch): a watcher
            # with nothing queued, not resyncing and not past these revisions gets the shared
            # bytes written at once; any other goes through push_chunks.
            bodies = [c.body for c in chunks]
            first = chunks[0].first
            after = chunks[-1].last + 1
            direct_sends = 0
            for watcher in group:
                direct = watcher.direct
                if (direct is not None and not watcher._chunks and watcher.resync_reason is None
                        and watcher.next_revision <= first and direct(bodies)):
                    watcher.next_revision = after
                    direct_sends += 1
                elif watcher.push_chunks(chunks):
                    self._flagged("slow")
            if direct_sends:
                self.events_sent_direct += direct_sends * sum(len(c.events) for c in chunks)

    def _trim(self) -> None:
        limits = self.limits
        while self._history and (
            self._history_events > limits.history_events_max or self._history_bytes > limits.history_bytes_max
        ):
            oldest = self._history.popleft()
            self._history_events -= len(oldest.events)
            self._history_bytes -= oldest.size
            self._cached_bytes -= oldest.cached_size
            self.floor = max(self.floor, oldest.last_revision)

    def subscribe(self, selector: Selector, start_revision: int | None, notify: Callable[[], None]) -> Watcher:
        """Start a watcher at ``start_revision`` (None: from the next revision)."""
        if self.watchers >= self.limits.watchers_max:
            from registry.errors import LimitExceeded

            raise LimitExceeded(f"at most {self.limits.watchers_max} watchers per node")
        start = self.revision + 1 if start_revision is None else start_revision
        if start < 1:
            raise InvalidArgument("start_revision must be at least 1")
        watcher = Watcher(selector, start, self.limits.queue_events_max, notify, self.limits.queue_bytes_max)
        if start <= self.revision:
            if start <= self.floor:
                watcher.mark_resync("compacted")
                self._flagged("compacted")
            else:
                for published in self._history:
                    if published.last_revision < start:
                        continue
                    charged = published.size
                    encoded = self._encoded(published)  # a batch kept unencoded is encoded now
                    self._history_bytes += published.size - charged
                    chunks = published.chunks.get(selector)
                    if chunks is None:
                        chunks = self._selected(selector, published.events, encoded)
                        # Kept for the next watch of this selector that starts this far back,
                        # within a budget as large as the history's own: past it, each such
                        # watch builds its messages again, as it did before the cache.
                        size = sum(len(c.body) for c in chunks)
                        if self._cached_bytes + size <= self.limits.history_bytes_max:
                            published.chunks[selector] = chunks
                            published.cached_size += size
                            self._cached_bytes += size
                    if watcher.push_chunks(chunks):
                        self._flagged("slow")
                        break
                # The budget now charges encoded sizes, which may exceed the hints: trim (this
                # watcher already holds what it needed from the trimmed batches).
                self._trim()
        self._groups.setdefault(selector, set()).add(watcher)
        self.watchers += 1
        return watcher

    def unsubscribe(self, watcher: Watcher) -> None:
        group = self._groups.get(watcher.selector)
        if group is not None and watcher in group:
            group.discard(watcher)
            self.watchers -= 1
            if not group:
                del self._groups[watcher.selector]

    def reset(self, revision: int) -> None:
        """The state was replaced wholesale (snapshot install) by the state at ``revision``.

        A snapshot ahead of the hub leaves a gap no event covers: the history is
        void and every watcher resyncs (reason ``restore``).  A snapshot at or
        below the hub's revision changes nothing here: Raft only ever installs
        committed state, so it is an older point of the very history the hub
        already published (a follower that caught up from buffered entries can
        then be handed the leader's older snapshot), and the node re-applies
        the same events up to where it was; the hub, its history and every
        watcher stay as they are, and the re-published events are ignored.
        """
        if revision <= self.revision:
            return
        self._history.clear()
        self._history_events = 0
        self._history_bytes = 0
        self._cached_bytes = 0
        self.revision = revision
        self.floor = revision
        for group in self._groups.values():
            for watcher in group:
                watcher.mark_resync("restore")
        if self.watchers:
            self._flagged("restore", self.watchers)
