"""WatchHub, Watcher, event_matches, parse_selector: pure, no I/O, no clock."""

from __future__ import annotations

import asyncio
import contextlib
import random
from typing import Any, cast

import msgpack
import pytest

from registry.errors import BadRequest, InvalidArgument, LimitExceeded, RegistryError
from registry.fsm.state import RegistryState
from registry.fsm.watch import HubLimits, Selector, Watcher, WatchHub, event_matches, parse_selector
from registry.raft.node import StateHolder
from registry.server.metrics import NodeMetrics
from registry.server.server import StreamSink
from registry.server.watch_service import WatchService, message_chunks

Event = dict[str, Any]


def ev(revision: int, kind: str = "instance", service: str | None = "web", id_: str | None = "i1",
       type_: str = "put", payload: str = "") -> Event:
    """An event shaped like ``registry.fsm.state._event``."""
    after = {"id": id_, "payload": payload} if type_ == "put" else None
    return {"revision": revision, "type": type_, "kind": kind, "service": service, "id": id_,
            "before": None, "after": after}


def revs(events: list[Event]) -> list[int]:
    return [e["revision"] for e in events]


class Notes:
    """A notify callback that counts its calls."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def noop() -> None:
    pass


WEB = Selector("service", "web")


def mixed_history(hub: WatchHub, last: int) -> list[Event]:
    """Publish revisions 1..last, alternating services web/api; return every event."""
    out = []
    for rev in range(1, last + 1):
        event = ev(rev, service="web" if rev % 2 else "api", id_=f"i{rev}")
        hub.publish(rev, [event])
        out.append(event)
    return out


# -- parse_selector -------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ({"service": "web"}, Selector("service", "web")),
        ({"prefix": "we"}, Selector("prefix", "we")),
        ({"prefix": ""}, Selector("prefix", "")),
        ({"all": True}, Selector("all")),
        # False and None mean "not given".
        ({"service": "web", "all": False, "prefix": None}, Selector("service", "web")),
        ({"service": "x" * 512}, Selector("service", "x" * 512)),
        ({"prefix": "p" * 512, "start_revision": 3}, Selector("prefix", "p" * 512)),
    ],
)
def test_parse_selector_accepts(args: dict[str, Any], expected: Selector) -> None:
    assert parse_selector(args) == expected


@pytest.mark.parametrize(
    ("args", "code"),
    [
        ({}, "BAD_REQUEST"),
        ({"all": False}, "BAD_REQUEST"),
        ({"service": "web", "prefix": "w"}, "BAD_REQUEST"),
        ({"service": "web", "all": True}, "BAD_REQUEST"),
        ({"service": "a", "prefix": "b", "all": True}, "BAD_REQUEST"),
        ({"all": 1}, "BAD_REQUEST"),
        ({"all": "yes"}, "BAD_REQUEST"),
        ({"service": 5}, "BAD_REQUEST"),
        ({"prefix": ["w"]}, "BAD_REQUEST"),
        ({"service": True}, "BAD_REQUEST"),
        ({"service": ""}, "INVALID_ARGUMENT"),
        ({"service": "x" * 513}, "INVALID_ARGUMENT"),
        ({"prefix": "x" * 513}, "INVALID_ARGUMENT"),
    ],
)
def test_parse_selector_refuses(args: dict[str, Any], code: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_selector(args)
    assert info.value.code == code


# -- event_matches ----------------------------------------------------------------

INSTANCE_WEB = ev(1, "instance", "web", "i1")
SERVICE_WEB = ev(1, "service", "web", None)
INSTANCE_WEBX = ev(1, "instance", "webx", "i1")
SERVICE_API = ev(1, "service", "api", None)
KEY_WEB = ev(1, "key", None, "web/config")
KEY_OTHER = ev(1, "key", None, "other")
LOCK_WEB = ev(1, "lock", None, "webmaster")
LEASE = ev(1, "lease", None, "7")


@pytest.mark.parametrize(
    ("selector", "event", "expected"),
    [
        (WEB, INSTANCE_WEB, True),
        (WEB, SERVICE_WEB, True),
        (WEB, INSTANCE_WEBX, False),
        (WEB, SERVICE_API, False),
        (WEB, KEY_WEB, False),  # a key named like the service is not the service
        (WEB, LOCK_WEB, False),
        (WEB, LEASE, False),
        (Selector("prefix", "web"), INSTANCE_WEB, True),
        (Selector("prefix", "web"), INSTANCE_WEBX, True),
        (Selector("prefix", "web"), SERVICE_WEB, True),
        (Selector("prefix", "web"), SERVICE_API, False),
        (Selector("prefix", "web"), KEY_WEB, True),
        (Selector("prefix", "web"), KEY_OTHER, False),
        (Selector("prefix", "web"), LOCK_WEB, True),
        (Selector("prefix", "web"), LEASE, False),
        (Selector("prefix", "webx"), INSTANCE_WEB, False),
        (Selector("prefix", ""), KEY_OTHER, True),
        (Selector("prefix", ""), LEASE, False),  # leases have no name to match
        (Selector("all"), INSTANCE_WEB, True),
        (Selector("all"), KEY_OTHER, True),
        (Selector("all"), LOCK_WEB, True),
        (Selector("all"), LEASE, True),
    ],
)
def test_event_matches(selector: Selector, event: Event, expected: bool) -> None:
    assert event_matches(selector, event) is expected


# -- publish and take ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("selector", "expected_ids"),
    [
        (WEB, ["w1", "w2", "w3"]),
        (Selector("prefix", "a"), ["a1", "a2"]),
        (Selector("prefix", "k"), ["k1"]),
        (Selector("all"), ["w1", "a1", "w2", "k1", "a2", "w3", "L"]),
    ],
)
def test_publish_delivers_matching_events_in_revision_order(selector: Selector, expected_ids: list[str]) -> None:
    hub = WatchHub(0)
    notes = Notes()
    watcher = hub.subscribe(selector, None, notes)
    hub.publish(1, [ev(1, service="web", id_="w1")])
    hub.publish(2, [ev(2, service="api", id_="a1")])
    hub.publish(3, [ev(3, service="web", id_="w2"), ev(3, "key", None, "k1")])  # one revision, two events
    hub.publish(4, [])  # a revision with no events (a barrier)
    hub.publish(5, [ev(5, service="api", id_="a2"), ev(5, service="web", id_="w3"), ev(5, "lease", None, "L")])
    taken = watcher.take(1000)
    assert [e["id"] for e in taken] == expected_ids
    assert revs(taken) == sorted(revs(taken))
    assert watcher.pending == 0 and watcher.resync_reason is None
    assert hub.revision == 5
    assert hub.events_published == 7
    assert notes.count >= 1
    # Nothing more to take; the watcher continues after the last revision it took.
    assert watcher.take(10) == []
    assert watcher.next_revision == taken[-1]["revision"] + 1


def test_publish_ignores_revisions_already_published() -> None:
    hub = WatchHub(0)
    watcher = hub.subscribe(WEB, None, noop)
    hub.publish(1, [ev(1)])
    hub.publish(2, [ev(2)])
    hub.publish(2, [ev(2)])  # a replayed batch
    hub.publish(1, [ev(1)])
    assert revs(watcher.take(10)) == [1, 2]
    assert hub.events_published == 2 and hub.revision == 2


def test_publish_without_events_advances_the_revision_only() -> None:
    hub = WatchHub(0)
    watcher = hub.subscribe(WEB, None, noop)
    hub.publish(7, [])
    assert hub.revision == 7 and watcher.pending == 0
    # A watch started now covers what comes after 7.
    late = hub.subscribe(WEB, None, noop)
    assert late.next_revision == 8


@pytest.mark.parametrize(("count_max", "expected_chunks"), [
    (1, [[1], [2, 2, 2], [3]]),
    (2, [[1, 2, 2, 2], [3]]),
    (4, [[1, 2, 2, 2], [3]]),
    (5, [[1, 2, 2, 2, 3]]),
])
def test_take_never_splits_a_revision(count_max: int, expected_chunks: list[list[int]]) -> None:
    hub = WatchHub(0)
    watcher = hub.subscribe(Selector("all"), None, noop)
    hub.publish(1, [ev(1)])
    hub.publish(2, [ev(2, id_="a"), ev(2, id_="b"), ev(2, id_="c")])
    hub.publish(3, [ev(3)])
    chunks = []
    while watcher.pending:
        chunks.append(revs(watcher.take(count_max)))
    assert chunks == expected_chunks


def test_message_chunks_keep_revisions_whole_and_respect_the_byte_budget() -> None:
    big = "x" * 1000
    events = [ev(1, payload=big), ev(2, id_="a", payload=big), ev(2, id_="b", payload=big), ev(3, payload=big)]
    one = len(msgpack.packb([events[0]], use_bin_type=True))
    # Room for about two events a message: revision 2 (two events) must stay together.
    chunks = message_chunks(events, bytes_max=2 * one + 10)
    assert [revs(c) for c in chunks] == [[1], [2, 2], [3]]
    # A revision bigger than the budget is still one message.
    assert [revs(c) for c in message_chunks(events, bytes_max=10)] == [[1], [2, 2], [3]]
    assert [revs(c) for c in message_chunks(events, bytes_max=1 << 20)] == [[1, 2, 2, 3]]
    assert message_chunks([]) == []


# -- subscribe from an older revision ---------------------------------------------------


@pytest.mark.parametrize(
    ("start", "expected_revisions"),
    [
        (1, [1, 3, 5, 7, 9]),
        (2, [3, 5, 7, 9]),
        (4, [5, 7, 9]),
        (9, [9]),
        (10, []),
        (11, []),  # the next revision: nothing to backfill
    ],
)
def test_subscribe_within_history_backfills_exactly_the_matching_events(
    start: int, expected_revisions: list[int]
) -> None:
    hub = WatchHub(0)
    mixed_history(hub, 10)  # web at odd revisions, api at even
    watcher = hub.subscribe(WEB, start, noop)
    assert watcher.resync_reason is None
    assert revs(watcher.take(1000)) == expected_revisions
    # And it continues live, without duplicates.
    hub.publish(11, [ev(11)])
    assert revs(watcher.take(1000)) == [11]


def hub_holding(events: float) -> tuple[WatchHub, str, int]:
    """A hub whose byte budget holds ``events`` one-event batches of the returned payload,
    and that batch's encoded size."""
    payload = "p" * 1000
    size = len(msgpack.packb([ev(1, payload=payload)], use_bin_type=True))
    return WatchHub(0, HubLimits(history_bytes_max=int(events * size))), payload, size


def test_subscribers_in_the_past_reuse_the_history_encodings() -> None:
    """Each event is encoded once, when published; 100 watchers starting behind the head encode nothing."""
    hub = WatchHub(0)
    mixed_history(hub, 10)
    assert hub.events_encoded == 10
    watchers = [hub.subscribe(WEB if i % 2 else Selector("all"), 2 + i % 3, noop) for i in range(100)]
    assert hub.events_encoded == 10
    assert revs(watchers[1].take(1000)) == [3, 5, 7, 9]  # WEB from 3
    assert revs(watchers[0].take(1000)) == list(range(2, 11))  # all from 2


def test_watches_resuming_from_the_past_share_one_build_of_each_batch() -> None:
    """A thousand watches of two selectors resuming after an overload: each batch is filtered and
    joined once per selector, not once per watch (that kept a node busy for seconds)."""
    hub = WatchHub(0)
    mixed_history(hub, 10)
    assert hub.selections_built == 0  # published with no watch open: no fan-out
    watchers = [hub.subscribe(WEB if i % 2 else Selector("all"), 2 + i % 3, noop) for i in range(1000)]
    # 10 batches, one per revision; watches start at revision 2 at the earliest: 9 per selector.
    assert hub.selections_built == 9 + 9
    assert revs(watchers[1].take(1000)) == [3, 5, 7, 9]  # WEB from 3
    assert revs(watchers[0].take(1000)) == list(range(2, 11))  # all from 2
    assert revs(watchers[5].take(1000)) == [5, 7, 9]  # WEB from 4: the shared batches, cut at its start


def test_the_resume_cache_has_its_own_budget_and_leaves_the_history_alone() -> None:
    """Cached messages never trim the history; past their budget, watches build their own again."""
    hub, payload, _ = hub_holding(3.5)
    for rev in range(1, 11):
        hub.publish(rev, [ev(rev, payload=payload)])
    assert hub.floor == 7
    first = hub.subscribe(Selector("all"), 8, noop)
    # The three batches' messages (about 3 x size) fit the cache budget; the history is untouched.
    assert hub.floor == 7
    assert revs(first.take(10)) == [8, 9, 10]
    assert hub.selections_built == 3
    # A second selector's messages do not fit any more: they are built, used, and not kept.
    second = hub.subscribe(WEB, 8, noop)
    assert revs(second.take(10)) == [8, 9, 10]
    assert hub.floor == 7
    assert revs(hub.subscribe(WEB, 9, noop).take(10)) == [9, 10]
    assert hub.selections_built == 3 + 3 + 2  # WEB built twice: not kept
    assert revs(hub.subscribe(Selector("all"), 8, noop).take(10)) == [8, 9, 10]
    assert hub.selections_built == 3 + 3 + 2  # "all" was kept
    # Trimming drops a batch with its cached messages: the budget is free again.
    hub.publish(11, [ev(11, payload=payload)])
    assert hub.floor == 8
    assert revs(hub.subscribe(WEB, 9, noop).take(10)) == [9, 10, 11]


def test_subscribe_backfill_keeps_every_event_of_a_multi_event_revision() -> None:
    hub = WatchHub(0)
    hub.publish(1, [ev(1, id_="a")])
    hub.publish(2, [ev(2, id_="b"), ev(2, service="api"), ev(2, id_="c")])
    hub.publish(4, [ev(3, id_="d"), ev(4, id_="e")])  # one batch, two revisions
    watcher = hub.subscribe(WEB, 2, noop)
    assert [e["id"] for e in watcher.take(100)] == ["b", "c", "d", "e"]
    watcher = hub.subscribe(WEB, 4, noop)
    assert [e["id"] for e in watcher.take(100)] == ["e"]


@pytest.mark.parametrize(
    ("hub_start", "start", "reason"),
    [
        (5, 1, "compacted"),
        (5, 5, "compacted"),  # revision 5 itself is not in the history
        (5, 6, None),
        (0, 1, None),
    ],
)
def test_subscribe_below_the_floor_gets_a_compacted_resync(hub_start: int, start: int, reason: str | None) -> None:
    hub = WatchHub(hub_start)
    notes = Notes()
    watcher = hub.subscribe(WEB, start, notes)
    assert watcher.resync_reason == reason
    assert watcher.pending == 0
    assert hub.resyncs == ({} if reason is None else {reason: 1})
    if reason is not None:
        assert notes.count == 1  # the shell is woken to send the snapshot


def test_subscribe_beyond_the_current_revision_waits_for_it() -> None:
    hub = WatchHub(0)
    mixed_history(hub, 10)
    watcher = hub.subscribe(WEB, 15, noop)
    assert watcher.resync_reason is None and watcher.pending == 0
    for rev in range(11, 20):
        hub.publish(rev, [ev(rev)])
    assert revs(watcher.take(100)) == [15, 16, 17, 18, 19]


@pytest.mark.parametrize("start", [0, -1, -100])
def test_subscribe_refuses_a_start_below_1(start: int) -> None:
    hub = WatchHub(0)
    with pytest.raises(InvalidArgument):
        hub.subscribe(WEB, start, noop)
    assert hub.watchers == 0 and hub.distinct == 0


# -- history trimming -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("history_events_max", "published", "floor"),
    [
        (5, 5, 0),
        (5, 6, 1),
        (5, 10, 5),
        (1, 10, 9),
    ],
)
def test_history_trims_by_event_count_and_raises_the_floor(history_events_max: int, published: int,
                                                           floor: int) -> None:
    hub = WatchHub(0, HubLimits(history_events_max=history_events_max))
    for rev in range(1, published + 1):
        hub.publish(rev, [ev(rev)])
    assert hub.floor == floor
    if floor > 0:
        assert hub.subscribe(WEB, floor, noop).resync_reason == "compacted"
    fresh = hub.subscribe(WEB, floor + 1, noop)
    assert fresh.resync_reason is None
    assert revs(fresh.take(100)) == list(range(floor + 1, published + 1))


def test_history_trims_a_whole_batch_at_once() -> None:
    hub = WatchHub(0, HubLimits(history_events_max=4))
    hub.publish(3, [ev(1), ev(2), ev(3)])  # one applied batch of three revisions
    hub.publish(4, [ev(4)])
    assert hub.floor == 0
    hub.publish(5, [ev(5)])  # 5 events > 4: the first batch goes, with all its revisions
    assert hub.floor == 3
    assert hub.subscribe(WEB, 2, noop).resync_reason == "compacted"
    assert revs(hub.subscribe(WEB, 4, noop).take(10)) == [4, 5]


def test_history_trims_by_bytes_and_raises_the_floor() -> None:
    hub, payload, size = hub_holding(3.5)
    for rev in range(1, 4):
        hub.publish(rev, [ev(rev, payload=payload)])
    assert hub.floor == 0
    hub.publish(4, [ev(4, payload=payload)])
    assert hub.floor == 1
    for rev in range(5, 11):
        hub.publish(rev, [ev(rev, payload=payload)])
    assert hub.floor == 7
    assert hub.subscribe(WEB, 7, noop).resync_reason == "compacted"
    assert revs(hub.subscribe(WEB, 8, noop).take(10)) == [8, 9, 10]
    # A batch bigger than the whole budget leaves nothing in history.
    hub.publish(11, [ev(11, payload="q" * (4 * size))])
    assert hub.floor == 11
    assert hub.subscribe(WEB, 11, noop).resync_reason == "compacted"


def test_with_a_size_hint_and_no_watch_open_events_wait_unencoded_until_a_resume() -> None:
    """Nobody watching: nothing is encoded at publish; the first watch resuming from the history
    encodes what it needs, once, and gets the same bytes an eagerly encoding hub would send."""
    lazy, eager = WatchHub(0), WatchHub(0)
    for rev in range(1, 11):
        events = [ev(rev, service="web" if rev % 2 else "api", id_=f"i{rev}")]
        lazy.publish(rev, events, size_hint=100)
        eager.publish(rev, events)
    assert (lazy.events_encoded, eager.events_encoded) == (0, 10)
    resumed = [lazy.subscribe(WEB, 4, noop) for _ in range(3)] + [lazy.subscribe(Selector("all"), 6, noop)]
    assert lazy.events_encoded == 7  # revisions 4..10, once each, for all four watches
    reference = eager.subscribe(WEB, 4, noop)
    assert [c.body for c in resumed[0].take_chunks()] == [c.body for c in reference.take_chunks()]
    assert revs(resumed[1].take(100)) == [5, 7, 9]
    assert revs(resumed[3].take(100)) == [6, 7, 8, 9, 10]
    # A watch from the head needs no history; one is open now, so publishing encodes again.
    live = lazy.subscribe(WEB, None, noop)
    assert lazy.events_encoded == 7
    lazy.publish(11, [ev(11)], size_hint=100)
    assert lazy.events_encoded == 8 and revs(live.take(10)) == [11]


def test_unencoded_events_are_charged_their_hint_and_trimmed_by_it() -> None:
    """The byte budget counts a lazily kept batch as its entry bytes plus EVENT_CHARGE_BYTES per event."""
    from registry.fsm.watch import EVENT_CHARGE_BYTES

    charge = 1000 + EVENT_CHARGE_BYTES
    hub = WatchHub(0, HubLimits(history_bytes_max=3 * charge))
    for rev in range(1, 4):
        hub.publish(rev, [ev(rev)], size_hint=1000)
    assert hub.floor == 0
    hub.publish(4, [ev(4)], size_hint=1000)
    assert hub.floor == 1
    assert hub.subscribe(WEB, 1, noop).resync_reason == "compacted"
    assert revs(hub.subscribe(WEB, 2, noop).take(10)) == [2, 3, 4]


def test_a_resume_that_encodes_more_than_the_hints_charged_trims_after_it() -> None:
    """Encoded sizes replace the hints once a resume encodes: the history may shrink, but the
    watch that caused it keeps every event it asked for."""
    hub, payload, _ = hub_holding(3)
    for rev in range(1, 6):
        hub.publish(rev, [ev(rev, payload=payload)], size_hint=10)  # an undercharge, on purpose
    assert hub.floor == 0
    watcher = hub.subscribe(WEB, 1, noop)
    assert revs(watcher.take(100)) == [1, 2, 3, 4, 5]
    assert hub.floor == 2  # 5 encoded events over a 3-event budget
    assert hub.subscribe(WEB, 2, noop).resync_reason == "compacted"
    assert revs(hub.subscribe(WEB, 3, noop).take(100)) == [3, 4, 5]


@pytest.mark.parametrize(
    "limits",
    [HubLimits(history_events_max=0), HubLimits(history_bytes_max=0), HubLimits(queue_events_max=0),
     HubLimits(queue_events_max=-1)],
)
def test_limits_must_be_positive(limits: HubLimits) -> None:
    with pytest.raises(InvalidArgument):
        WatchHub(0, limits)


# -- slow watchers ---------------------------------------------------------------------


def test_a_watcher_whose_queue_overflows_is_resynced_slow_and_others_are_unaffected() -> None:
    hub = WatchHub(0, HubLimits(queue_events_max=3))
    slow_notes = Notes()
    slow = hub.subscribe(WEB, None, slow_notes)
    fast = hub.subscribe(WEB, None, noop)  # same selector, same group
    other = hub.subscribe(Selector("prefix", "a"), None, noop)
    assert hub.distinct == 2
    fast_seen: list[int] = []
    for rev in range(1, 4):
        hub.publish(rev, [ev(rev)])
        fast_seen += revs(fast.take(10))
    assert slow.pending == 3 and slow.resync_reason is None
    hub.publish(4, [ev(4), ev(4, "service", "api", None)])
    fast_seen += revs(fast.take(10))
    assert slow.resync_reason == "slow"
    assert hub.resyncs == {"slow": 1}  # counted when flagged, before any snapshot is sent
    assert slow.pending == 0  # its queue is dropped
    assert slow.dropped == 4
    assert slow_notes.count >= 4
    # While flagged, nothing more is queued for it.
    hub.publish(5, [ev(5)])
    hub.publish(6, [ev(6)])
    assert slow.pending == 0
    fast_seen += revs(fast.take(10))
    assert fast_seen == [1, 2, 3, 4, 5, 6]
    assert fast.resync_reason is None
    assert revs(other.take(10)) == [4]
    # The shell sends a snapshot at the state's revision, 8 (ahead of the hub:
    # 7 and 8 are applied but not yet published): it skips events up to 8.
    slow.resynced(8)
    assert slow.resync_reason is None and slow.next_revision == 9
    for rev in range(7, 11):
        hub.publish(rev, [ev(rev)])
        fast_seen += revs(fast.take(10))
    assert revs(slow.take(10)) == [9, 10]
    assert fast_seen == list(range(1, 11))
    assert hub.resyncs == {"slow": 1}


def test_backfill_larger_than_the_queue_resyncs_slow() -> None:
    hub = WatchHub(0, HubLimits(queue_events_max=3))
    mixed_history(hub, 10)
    assert hub.subscribe(WEB, 1, noop).resync_reason == "slow"  # 5 matching events > 3
    assert hub.resyncs == {"slow": 1}
    assert revs(hub.subscribe(WEB, 6, noop).take(10)) == [7, 9]


def test_resynced_drops_queued_events_at_or_below_the_snapshot() -> None:
    watcher = Watcher(WEB, 1, 100, noop)
    watcher.push([ev(1), ev(2), ev(3), ev(4)])
    watcher.resynced(2)
    assert revs(watcher.take(10)) == [3, 4]
    watcher.push([ev(4), ev(5)])  # already covered: 4
    assert revs(watcher.take(10)) == [5]


@pytest.mark.parametrize("reason", ["list", "compacted", "slow", "restore"])
def test_mark_resync_clears_the_queue_until_resynced(reason: str) -> None:
    notes = Notes()
    watcher = Watcher(WEB, 1, 100, notes)
    watcher.push([ev(1)])
    watcher.mark_resync(reason)
    assert watcher.resync_reason == reason and watcher.pending == 0 and notes.count == 2
    watcher.push([ev(2)])
    assert watcher.pending == 0
    watcher.resynced(2)
    watcher.push([ev(3)])
    assert revs(watcher.take(10)) == [3]


# -- groups, reset, limits -------------------------------------------------------------------


def test_identical_selectors_share_one_group() -> None:
    hub = WatchHub(0)
    a = hub.subscribe(WEB, None, noop)
    b = hub.subscribe(Selector("service", "web"), None, noop)
    assert hub.distinct == 1 and hub.watchers == 2
    c = hub.subscribe(Selector("prefix", "web"), None, noop)
    d = hub.subscribe(Selector("all"), None, noop)
    assert hub.distinct == 3 and hub.watchers == 4
    hub.publish(1, [ev(1)])
    assert [w.pending for w in (a, b, c, d)] == [1, 1, 1, 1]
    hub.unsubscribe(a)
    assert hub.distinct == 3 and hub.watchers == 3
    hub.unsubscribe(b)
    assert hub.distinct == 2 and hub.watchers == 2
    hub.unsubscribe(b)  # twice: no-op
    assert hub.distinct == 2 and hub.watchers == 2
    hub.publish(2, [ev(2)])
    assert revs(a.take(10)) == [1]  # unsubscribed: gets nothing new
    hub.unsubscribe(c)
    hub.unsubscribe(d)
    assert hub.distinct == 0 and hub.watchers == 0


def test_reset_resyncs_every_watcher_with_restore_and_voids_history() -> None:
    hub = WatchHub(0)
    mixed_history(hub, 10)
    watchers = [hub.subscribe(WEB, 3, noop), hub.subscribe(Selector("all"), None, noop),
                hub.subscribe(Selector("prefix", "a"), 100, noop)]
    assert watchers[0].pending > 0
    hub.reset(50)
    assert [w.resync_reason for w in watchers] == ["restore"] * 3
    assert hub.resyncs == {"restore": 3}
    assert all(w.pending == 0 for w in watchers)
    assert hub.revision == 50 and hub.floor == 50
    assert hub.subscribe(WEB, 10, noop).resync_reason == "compacted"
    assert hub.subscribe(WEB, 50, noop).resync_reason == "compacted"
    late = hub.subscribe(WEB, 51, noop)
    hub.publish(40, [ev(40)])  # older than the restored state: ignored
    hub.publish(51, [ev(51)])
    assert revs(late.take(10)) == [51]


def test_reset_to_an_older_point_of_the_same_history_changes_nothing() -> None:
    """A follower may install the leader's snapshot older than what it applied, then re-apply."""
    hub = WatchHub(0)
    mixed_history(hub, 10)
    watcher = hub.subscribe(WEB, 4, noop)
    assert revs(watcher.take(2)) == [5, 7]
    for revision in (7, 10):
        hub.reset(revision)
        assert watcher.resync_reason is None and hub.resyncs == {}
        assert hub.revision == 10 and hub.floor == 0
    # The node re-applies 8..10: already published, ignored; then the history goes on.
    for rev in range(8, 12):
        hub.publish(rev, [ev(rev)])
    assert revs(watcher.take(10)) == [9, 11]
    assert revs(hub.subscribe(WEB, 1, noop).take(100)) == [1, 3, 5, 7, 9, 11]


def test_watchers_max_is_enforced_per_node() -> None:
    hub = WatchHub(0, HubLimits(watchers_max=2))
    a = hub.subscribe(WEB, None, noop)
    hub.subscribe(Selector("all"), None, noop)
    with pytest.raises(LimitExceeded) as info:
        hub.subscribe(WEB, None, noop)
    assert info.value.code == "LIMIT_EXCEEDED"
    assert hub.watchers == 2
    hub.unsubscribe(a)
    hub.subscribe(WEB, None, noop)
    assert hub.watchers == 2


# -- a randomized check of the whole contract ------------------------------------------------


class SimWatch:
    """What one watcher's client ends up with: snapshot contents, then events."""

    def __init__(self, watcher: Watcher, begin: int) -> None:
        self.watcher = watcher
        self.begin = begin
        self.events: list[Event] = []
        #: Highest revision covered; an event may repeat it only within one revision group.
        self.last = begin - 1
        self.group_open = False


@pytest.mark.parametrize("seed", range(40))
def test_every_watcher_sees_each_matching_event_once_in_order_or_a_snapshot(seed: int) -> None:
    """Random publishes, subscriptions, takes and resets against a simulated shell.

    The shell's snapshot is "everything matching up to R"; what a watcher ends
    up with (snapshot contents + events after it) must equal every matching
    event from its start, with no revision twice and none out of order.
    """
    rng = random.Random(seed)
    limits = HubLimits(history_events_max=rng.choice([3, 10, 1000]), queue_events_max=rng.choice([2, 5, 1000]))
    hub = WatchHub(0, limits)
    log: list[Event] = []  # every event ever published
    selectors = [WEB, Selector("service", "api"), Selector("prefix", "w"), Selector("all")]
    sims: list[SimWatch] = []
    revision = 0

    def sync(sim: SimWatch) -> None:
        w = sim.watcher
        if w.resync_reason is not None:
            # The snapshot: everything matching at the current revision.
            sim.events = [e for e in log if event_matches(w.selector, e)]
            sim.begin = 1
            sim.last = revision
            sim.group_open = False
            w.resynced(revision)
            return
        taken = w.take(rng.choice([1, 3, 100]))
        for e in taken:
            same_group = sim.group_open and e["revision"] == sim.last
            assert e["revision"] > sim.last or same_group, f"revision {e['revision']} after {sim.last}"
            assert event_matches(w.selector, e)
            sim.events.append(e)
            sim.last = e["revision"]
            sim.group_open = True
        # A take ends on a whole revision: the next one must start a new revision.
        sim.group_open = False

    for _ in range(300):
        action = rng.random()
        if action < 0.55:
            revision += 1
            names = rng.choices(["web", "api", "www", "x"], k=rng.choice([1, 1, 2, 3]))
            batch = [ev(revision, service=n, id_=f"{n}{revision}-{i}") for i, n in enumerate(names)]
            log.extend(batch)
            hub.publish(revision, batch)
        elif action < 0.65:
            start = rng.choice([None, max(1, revision - rng.randrange(0, 15)), revision + rng.randrange(1, 4)])
            w = hub.subscribe(rng.choice(selectors), start, noop)
            sims.append(SimWatch(w, revision + 1 if start is None else start))
        elif action < 0.98 and sims:
            sync(rng.choice(sims))
        elif action >= 0.98:
            hub.reset(revision)
    for sim in sims:
        for _ in range(1000):
            if sim.watcher.pending == 0 and sim.watcher.resync_reason is None:
                break
            sync(sim)
        assert sim.watcher.pending == 0 and sim.watcher.resync_reason is None
        expected = [e["id"] for e in log if event_matches(sim.watcher.selector, e) and e["revision"] >= sim.begin]
        assert [e["id"] for e in sim.events] == expected


def test_registry_errors_are_the_wire_codes() -> None:
    # Watch refusals travel as stream errors; their codes are part of the contract.
    assert issubclass(InvalidArgument, BadRequest) and issubclass(BadRequest, RegistryError)
    assert (BadRequest.code, InvalidArgument.code, LimitExceeded.code) == (
        "BAD_REQUEST", "INVALID_ARGUMENT", "LIMIT_EXCEEDED")


# -- the asyncio shell: a snapshot never goes below what the stream already covered ----------------


class FakeSink:
    """Collects stream items; never blocks."""

    def __init__(self) -> None:
        self.items: list[Item] = []
        self.closed = False

    def send(self, body: Any) -> None:
        self.items.append(body)

    def send_encoded(self, body: bytes) -> None:
        self.items.append(msgpack.unpackb(body))

    def try_send_encoded(self, bodies: list[bytes]) -> bool:
        self.items.extend(msgpack.unpackb(body) for body in bodies)
        return True

    async def drain(self) -> None:
        return None


Item = dict[str, Any]


def reg(iid: str) -> dict[str, Any]:
    return {"op": "register", "service": "web", "id": iid, "address": "10.0.0.1", "port": 80}


def test_a_snapshot_waits_until_the_state_is_back_where_the_hub_was() -> None:
    """After a node went back to an older snapshot, a list waits for the state to re-apply."""

    async def run() -> list[Item]:
        holder = StateHolder()
        service = WatchService(WatchHub(0), holder, NodeMetrics())
        for iid in ("a", "b"):
            applied = holder.state.apply(reg(iid))
            service.publish(holder.state.revision, applied.events)
        # The node installs an older snapshot (revision 1) of the same history.
        older = RegistryState()
        older.apply(reg("a"))
        holder.state = older
        service.restored()
        sink = FakeSink()
        task = asyncio.get_running_loop().create_task(
            service.watch({"service": "web", "list": True, "progress_ms": 100}, cast(StreamSink, sink)))
        for _ in range(30):  # three progress periods
            await asyncio.sleep(0.01)
        assert sink.items == [{"type": "created", "revision": 2}]  # no snapshot at revision 1
        # The node re-applies revision 2: now the list can go out, at 2.
        holder.state.apply(reg("b"))
        service.publish(2, [])
        for _ in range(50):
            await asyncio.sleep(0.01)
            if len(sink.items) > 1:
                break
        sink.closed = True
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return sink.items

    items = asyncio.run(run())
    assert items[0] == {"type": "created", "revision": 2}
    snapshot = items[1]
    assert (snapshot["type"], snapshot["reason"], snapshot["revision"]) == ("snapshot", "list", 2)
    assert [i["id"] for i in snapshot["services"][0]["instances"]] == ["a", "b"]
