"""The endpoint table: watch items in, endpoints out."""

from __future__ import annotations

from typing import Any

from registry.agent.endpoint import Endpoint
from registry.agent.table import EndpointTable


def inst(i: str, port: int = 9000, status: str = "passing", weight: int = 1, service: str = "api") -> dict[str, Any]:
    return {"service": service, "id": i, "address": "127.0.0.1", "port": port, "meta": {}, "tags": [],
            "weight": weight, "status": status, "lease": None, "create_revision": 1, "mod_revision": 1}


def snapshot(revision: int, *instances: dict[str, Any], reason: str = "list") -> dict[str, Any]:
    services = [{"service": {"name": "api"}, "instances": list(instances)}] if instances else []
    return {"type": "snapshot", "reason": reason, "revision": revision, "services": services, "keys": []}


def event(revision: int, type_: str, i: str, after: dict[str, Any] | None = None, kind: str = "instance",
          service: str = "api") -> dict[str, Any]:
    return {"revision": revision, "type": type_, "kind": kind, "service": service, "id": i, "before": None,
            "after": after}


def events(*evs: dict[str, Any]) -> dict[str, Any]:
    return {"type": "events", "events": list(evs)}


def ids(table: EndpointTable) -> list[tuple[str, str]]:
    return [(e.id, e.status) for e in table.endpoints()]


def test_items_in_order() -> None:
    t = EndpointTable("api")
    steps: list[tuple[dict[str, Any], bool, list[tuple[str, str]], int]] = [
        ({"type": "created", "revision": 4}, False, [], 4),
        (snapshot(4, inst("b"), inst("a")), True, [("a", "passing"), ("b", "passing")], 4),
        (events(event(5, "put", "c", inst("c"))), True, [("a", "passing"), ("b", "passing"), ("c", "passing")], 5),
        (events(event(6, "status", "b", inst("b", status="critical"))), True,
         [("a", "passing"), ("b", "critical"), ("c", "passing")], 6),
        # a lease expiry removes several instances in one revision
        (events(event(7, "expire", "a"), event(7, "expire", "c")), True, [("b", "critical")], 7),
        ({"type": "progress", "revision": 9}, False, [("b", "critical")], 9),
        # other services' events only move the revision
        (events(event(10, "put", "x", inst("x", service="web"), service="web")), False, [("b", "critical")], 10),
        (events(event(11, "delete", "b")), True, [], 11),
    ]
    for item, changed, expected, revision in steps:
        assert t.apply(item) is changed, item
        assert ids(t) == expected
        assert t.revision == revision


def test_old_or_repeated_events_are_skipped() -> None:
    t = EndpointTable("api")
    t.apply(snapshot(10, inst("a")))
    assert not t.apply(events(event(9, "delete", "a")))
    assert not t.apply(events(event(10, "delete", "a")))
    assert ids(t) == [("a", "passing")]


def test_same_revision_in_one_message_applies_whole() -> None:
    t = EndpointTable("api")
    t.apply(snapshot(1, inst("a"), inst("b")))
    assert t.apply(events(event(2, "delete", "a"), event(2, "delete", "b")))
    assert ids(t) == []


def test_resync_snapshot_replaces_everything() -> None:
    t = EndpointTable("api")
    t.apply(snapshot(3, inst("a"), inst("b")))
    assert t.apply(snapshot(40, inst("c"), reason="compacted"))
    assert ids(t) == [("c", "passing")]
    assert not t.apply(snapshot(41, inst("c"), reason="slow"))  # same endpoints: no change


def test_service_delete_and_unknown_service() -> None:
    t = EndpointTable("api")
    assert not t.apply(snapshot(1))  # the service does not exist (yet): not an error
    assert t.listed and len(t) == 0
    assert t.apply(events(event(2, "put", "a", inst("a"))))
    assert t.apply(events(event(3, "delete", "", kind="service")))
    assert len(t) == 0


def test_a_put_that_changes_nothing_routable_is_not_a_change() -> None:
    t = EndpointTable("api")
    t.apply(snapshot(1, inst("a", port=1, weight=3)))
    assert not t.apply(events(event(2, "put", "a", inst("a", port=1, weight=3))))
    assert t.apply(events(event(3, "put", "a", inst("a", port=2, weight=3))))
    assert t.endpoints() == (Endpoint("api", "a", "127.0.0.1", 2, weight=3),)
