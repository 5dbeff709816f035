"""The Consul front end's pure parts: parameters, shapes, selection, indexes, write bodies."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from registry.errors import BadRequest, InvalidArgument
from registry.fsm import model
from registry.fsm.state import RegistryState
from registry.server.consul import catalog, kv, params, tracking, writes

DC = "dc1"
ALL = params.BLOCKING_PARAMS | {"tag", "passing"}


# -- Go durations ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0.0), ("10s", 10.0), ("1m30s", 90.0), ("1.5h", 5400.0), ("250ms", 0.25), ("100us", 1e-4),
        ("100µs", 1e-4), ("2h45m", 9900.0), (".5s", 0.5), ("1.s", 1.0), ("+5s", 5.0), ("-5s", -5.0),
        ("7ns", 7e-9),
    ],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert params.parse_duration_s(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "s", "10 s", "1m 30s", "10sec", "1d", "abc", "1e3s", "--5s", "10s!",
                                  "x" * 100])
def test_bad_go_durations(text: str) -> None:
    with pytest.raises(InvalidArgument, match="duration"):
        params.parse_duration_s(text)


# -- query parameters --------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({}, params.Query()),
        ({"index": ["42"]}, params.Query(index=42)),
        ({"index": ["0"], "wait": ["30s"]}, params.Query(wait_s=30.0)),
        ({"wait": ["1h"]}, params.Query(wait_s=params.WAIT_MAX_S)),
        ({"stale": [""]}, params.Query(stale=True)),
        ({"stale": ["false"]}, params.Query()),
        ({"cached": [""]}, params.Query(stale=True)),
        ({"consistent": [""]}, params.Query()),
        ({"tag": ["a", "b c"]}, params.Query(tags=("a", "b c"))),
        ({"passing": ["1"]}, params.Query(passing=True)),
        ({"passing": ["false"]}, params.Query()),
        ({"token": ["s3cret"]}, params.Query(token="s3cret")),
        ({"dc": [DC], "ns": ["default"], "partition": [""]}, params.Query()),
    ],
)
def test_query_parsing(query: dict[str, list[str]], expected: params.Query) -> None:
    parsed, own = params.parse_query(query, ALL, datacenter=DC)
    assert parsed == expected
    assert own == {}


@pytest.mark.parametrize(
    ("query", "error", "message"),
    [
        ({"index": ["-1"]}, BadRequest, "index"),
        ({"index": ["abc"]}, BadRequest, "index"),
        ({"index": ["+1"]}, BadRequest, "index"),
        ({"index": ["1_0"]}, BadRequest, "index"),
        ({"index": ["٣"]}, BadRequest, "index"),
        ({"index": [str(2**63)]}, BadRequest, "index"),
        ({"wait": ["5"]}, InvalidArgument, "duration"),
        ({"wait": ["-5s"]}, InvalidArgument, "negative"),
        ({"stale": [""], "consistent": [""]}, BadRequest, "opposite"),
        ({"stale": ["maybe"]}, InvalidArgument, "stale"),
        ({"filter": ["Service.Tags contains x"]}, BadRequest, "filter"),
        ({"near": ["_agent"]}, BadRequest, "near"),
        ({"node-meta": ["a:b"]}, BadRequest, "node-meta"),
        ({"peer": ["other"]}, BadRequest, "peer"),
        ({"ns": ["team-a"]}, BadRequest, "default ns"),
        ({"partition": ["p"]}, BadRequest, "default partition"),
        ({"dc": ["dc2"]}, BadRequest, "datacenter"),
        ({"bogus": ["1"]}, BadRequest, "unsupported query parameter"),
        ({"tag": ["t"] * (params.TAGS_PER_QUERY_MAX + 1)}, InvalidArgument, "tag"),
    ],
)
def test_refused_query_parameters(query: dict[str, list[str]], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        params.parse_query(query, ALL, datacenter=DC)


def test_endpoint_parameters_are_passed_through() -> None:
    parsed, own = params.parse_query({"recurse": [""], "index": ["3"]}, params.BLOCKING_PARAMS | {"recurse"},
                                     datacenter=DC)
    assert parsed.index == 3
    assert own == {"recurse": [""]}


def test_parameters_an_endpoint_does_not_take_are_refused() -> None:
    with pytest.raises(BadRequest, match=r"\?tag"):
        params.parse_query({"tag": ["x"]}, params.BLOCKING_PARAMS, datacenter=DC)


# -- shapes ------------------------------------------------------------------------------------

def _state() -> RegistryState:
    state = RegistryState()
    for iid, tags, status in (("w1", ["blue", "v1"], "passing"), ("w2", ["blue"], "critical"),
                              ("w3", ["green", "v1"], "warning")):
        state.apply({"op": "register", "service": "web", "id": iid, "address": "10.0.0.1", "port": 8080,
                     "tags": tags, "meta": {"zone": "a"}, "weight": 5, "status": status})
    state.apply({"op": "register", "service": "db", "id": "d1", "address": "10.0.0.2", "port": 5432})
    state.apply({"op": "service_put", "name": "empty"})
    return state


@pytest.mark.parametrize(
    ("tags", "passing", "ids"),
    [
        ((), False, ["w1", "w2", "w3"]),
        ((), True, ["w1"]),
        (("blue",), False, ["w1", "w2"]),
        (("blue", "v1"), False, ["w1"]),
        (("v1",), True, ["w1"]),
        (("green",), True, []),
        (("nope",), False, []),
    ],
)
def test_select_instances(tags: tuple[str, ...], passing: bool, ids: list[str]) -> None:
    instances = _state().get_service("web")["instances"]
    assert [i["id"] for i in catalog.select_instances(instances, tags, passing)] == ids


def test_catalog_services_unions_tags_and_leaves_out_empty_services() -> None:
    state = _state()
    services = [(s["name"], state.get_service(s["name"])["instances"]) for s in state.list_services()]
    assert catalog.catalog_services(services) == {"db": [], "web": ["blue", "green", "v1"]}


def test_catalog_service_entry_fields() -> None:
    site = catalog.Site("dc1", "regctl", "127.0.0.1")
    inst = _state().get_instance("web", "w1")
    entry = catalog.catalog_service_entry(site, inst)
    assert entry["ServiceID"] == "w1" and entry["ServiceName"] == "web"
    assert entry["ServiceAddress"] == "10.0.0.1" and entry["ServicePort"] == 8080
    assert entry["ServiceTags"] == ["blue", "v1"] and entry["ServiceMeta"] == {"zone": "a"}
    assert entry["ServiceWeights"] == {"Passing": 5, "Warning": 1}
    assert entry["Node"] == "regctl" and entry["Datacenter"] == "dc1" and entry["Address"] == "127.0.0.1"
    assert entry["CreateIndex"] == 1 and entry["ModifyIndex"] == 1
    assert entry["ID"] == site.node_id == catalog.Site("dc1", "regctl", "10.9.9.9").node_id


def test_health_entry_has_one_service_check_with_the_note() -> None:
    site = catalog.Site()
    inst = _state().get_instance("web", "w3")
    entry = catalog.health_entry(site, inst, "slow disk")
    assert entry["Node"]["Node"] == site.node_name
    assert entry["Service"]["ID"] == "w3" and entry["Service"]["Service"] == "web"
    assert entry["Service"]["Weights"] == {"Passing": 5, "Warning": 1}
    (check,) = entry["Checks"]
    assert check["CheckID"] == "service:w3" and check["Status"] == "warning" and check["Output"] == "slow disk"
    assert check["ServiceID"] == "w3" and check["ServiceName"] == "web" and check["Type"] == "ttl"


@pytest.mark.parametrize(("state_name", "ids"), [("any", ["w1", "w2", "w3"]), ("passing", ["w1"]),
                                                 ("warning", ["w3"]), ("critical", ["w2"])])
def test_health_state(state_name: str, ids: list[str]) -> None:
    instances = _state().get_service("web")["instances"]
    checks = catalog.health_state(catalog.Site(), instances, state_name, {("web", "w2"): "down"})
    assert [c["ServiceID"] for c in checks] == ids
    assert all(c["Output"] == ("down" if c["ServiceID"] == "w2" else "") for c in checks)


@pytest.mark.parametrize(("check", "iid"), [("service:w1", "w1"), ("service:a:b", "a:b"), ("service:", None),
                                            ("serfHealth", None), ("w1", None)])
def test_instance_id_of_check(check: str, iid: str | None) -> None:
    assert catalog.instance_id_of_check(check) == iid


def test_agent_self_names_the_datacenter_and_node() -> None:
    site = catalog.Site("east", "regctl")
    me = catalog.agent_self(site, 7, "n1")
    assert me["Config"]["Datacenter"] == "east" and me["Config"]["NodeName"] == "regctl"
    assert me["Config"]["NodeID"] == site.node_id


# -- KV ----------------------------------------------------------------------------------------

def test_kv_entry_is_base64() -> None:
    entry = kv.kv_entry(model.key_record("a/b", "héllo", None, 3, 5))
    assert base64.b64decode(entry["Value"]).decode() == "héllo"
    assert (entry["Key"], entry["CreateIndex"], entry["ModifyIndex"], entry["Flags"]) == ("a/b", 3, 5, 0)
    assert kv.kv_entry(model.key_record("e", "", None, 1, 1))["Value"] is None


@pytest.mark.parametrize(
    ("prefix", "separator", "expected"),
    [
        ("", None, ["a/b", "a/c/d", "a/c/e", "b"]),
        ("a/", None, ["a/b", "a/c/d", "a/c/e"]),
        ("", "/", ["a/", "b"]),
        ("a/", "/", ["a/b", "a/c/"]),
        ("z", None, []),
    ],
)
def test_kv_keys(prefix: str, separator: str | None, expected: list[str]) -> None:
    assert kv.kv_keys(["a/b", "a/c/d", "a/c/e", "b"], prefix, separator) == expected


@pytest.mark.parametrize(("body", "message"), [(b"\xff\xfe", "UTF-8"), (b"x" * (model.VALUE_BYTES_MAX + 1), "bytes")])
def test_kv_value_refused(body: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        kv.kv_value(body)


# -- indexes -----------------------------------------------------------------------------------

def _tracked(state: RegistryState, tracker: tracking.ChangeTracker, command: dict[str, Any]) -> int:
    applied = state.apply(command)
    tracker.observe(state.revision, applied.events)
    return state.revision


def _health_index(state: RegistryState, tracker: tracking.ChangeTracker, memo: tracking.AnswerMemo,
                  tags: tuple[str, ...], passing: bool) -> int:
    selected = catalog.select_instances(state.get_service("web")["instances"], tags, passing)
    digest = repr([catalog.health_entry(catalog.Site(), i) for i in selected]).encode()
    candidate = tracking.candidate_index((i["mod_revision"] for i in selected), tracker.service_mark("web"),
                                         state.revision, tracker.revision)
    return memo.settle(f"health/web/{tags}/{passing}", digest, candidate)


def test_index_moves_only_when_the_answer_does() -> None:
    state, tracker, memo = RegistryState(), tracking.ChangeTracker(), tracking.AnswerMemo()
    reg = {"op": "register", "service": "web", "address": "10.0.0.1", "port": 80}
    r1 = _tracked(state, tracker, {**reg, "id": "a", "tags": ["blue"]})
    _tracked(state, tracker, {**reg, "id": "b", "tags": ["green"]})
    blue = _health_index(state, tracker, memo, ("blue",), False)
    assert blue == r1
    # A change to another instance, outside the answer: same index, even though the service's mark moved.
    _tracked(state, tracker, {"op": "set_status", "service": "web", "id": "b", "status": "critical"})
    assert _health_index(state, tracker, memo, ("blue",), False) == r1
    # Leaving the passing answer: the index is the revision of that change, though no record in it says so.
    passing = _health_index(state, tracker, memo, (), True)
    r4 = _tracked(state, tracker, {"op": "set_status", "service": "web", "id": "a", "status": "critical"})
    assert _health_index(state, tracker, memo, (), True) == r4 > passing
    # A delete: the answer's index is the delete's revision.
    r5 = _tracked(state, tracker, {"op": "deregister", "service": "web", "id": "a"})
    assert _health_index(state, tracker, memo, ("blue",), False) == r5


def test_index_is_never_below_one_and_never_goes_back() -> None:
    memo = tracking.AnswerMemo()
    assert tracking.candidate_index([], 0, 0, 0) == 1
    assert memo.settle("q", b"a", 9) == 9
    assert memo.settle("q", b"a", 12) == 9  # same answer: same index
    assert memo.settle("q", b"b", 5) == 10  # changed, though the candidate is lower: still forward
    assert memo.settle("q", b"b", 20) == 10


def test_a_state_ahead_of_the_tracker_gives_its_revision() -> None:
    assert tracking.candidate_index([3], 4, state_revision=9, tracked_revision=7) == 9
    assert tracking.candidate_index([3], 4, state_revision=7, tracked_revision=7) == 4


def test_memo_is_bounded() -> None:
    memo = tracking.AnswerMemo(answers_max=2)
    for query in ("a", "b", "c"):
        memo.settle(query, b"x", 1)
    assert len(memo) == 2
    assert memo.settle("a", b"x", 5) == 5  # forgotten: the candidate again


def test_tracker_forgets_marks_but_keeps_a_floor() -> None:
    tracker = tracking.ChangeTracker(services_tracked_max=2)
    for rev, name in enumerate(("a", "b", "c"), start=1):
        tracker.observe(rev, [{"revision": rev, "kind": "instance", "type": "delete", "service": name, "id": "i",
                               "before": {}, "after": None}])
    assert tracker.service_mark("c") == 3
    assert tracker.service_mark("a") == 2  # forgotten: the floor, never lower than the truth
    assert tracker.any_service_mark == 3


def test_tracker_keeps_notes_and_key_deletes() -> None:
    state, tracker = RegistryState(), tracking.ChangeTracker()
    _tracked(state, tracker, {"op": "register", "service": "web", "id": "a", "address": "h", "port": 1})
    _tracked(state, tracker, {"op": "set_status", "service": "web", "id": "a", "status": "warning", "note": "slow"})
    assert tracker.note("web", "a") == "slow"
    _tracked(state, tracker, {"op": "deregister", "service": "web", "id": "a"})
    assert tracker.note("web", "a") == ""
    _tracked(state, tracker, {"op": "key_put", "key": "k", "value": "v"})
    assert tracker.key_mark == 0
    r = _tracked(state, tracker, {"op": "key_delete", "key": "k"})
    assert tracker.key_mark == r
    tracker.restored(50)
    assert tracker.service_mark("anything") == 50 and tracker.key_mark == 50


# -- write bodies ------------------------------------------------------------------------------

def test_registration_with_ttl_check() -> None:
    reg = writes.parse_registration(
        {"Name": "web", "ID": "w1", "Address": "10.0.0.3", "Port": 80, "Tags": ["traefik.enable=true",
                                                                                "rule=Host(`a.test`) && x"],
         "Meta": {"v": "1"}, "Weights": {"Passing": 3, "Warning": 1},
         "Check": {"TTL": "15s", "DeregisterCriticalServiceAfter": "1m"}},
        "192.0.2.1",
    )
    assert reg == writes.Registration("web", "w1", "10.0.0.3", 80, ["traefik.enable=true", "rule=Host(`a.test`) && x"],
                                      {"v": "1"}, 3, "critical", 15_000)
    assert reg.register_args(7)["lease"] == 7


def test_registration_as_py_consul_sends_it() -> None:
    # Lowercase keys and a "checks" list, as py-consul's agent.service.register builds them.
    reg = writes.parse_registration({"name": "api", "port": 9000, "checks": [{"ttl": "5s", "status": "passing"}]},
                                    "192.0.2.1")
    assert (reg.service, reg.id, reg.address, reg.ttl_ms, reg.status) == ("api", "api", "192.0.2.1", 5000, "passing")
    plain = writes.parse_registration({"Name": "api", "Port": 1, "enable_tag_override": False}, "h")
    assert plain.ttl_ms is None and plain.status == "passing"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "JSON object"),
        ({}, "Name"),
        ({"Name": 5, "Port": 1}, "Name must be a string"),
        ({"Name": "a", "Port": "80"}, "Port must be an integer"),
        ({"Name": "a", "Port": True}, "Port must be an integer"),
        ({"Name": "a"}, "port"),
        ({"Name": "a", "Port": 1, "Tags": "x"}, "Tags"),
        ({"Name": "a", "Port": 1, "Meta": {"k": 1}}, "Meta"),
        ({"Name": "a", "Port": 1, "Bogus": 1}, "unknown field"),
        ({"Name": "a", "Port": 1, "name": "b"}, "twice"),
        ({"Name": "a", "Port": 1, "Check": {"HTTP": "http://x", "Interval": "10s"}}, "not run by the registry"),
        ({"Name": "a", "Port": 1, "Check": {"TTL": "10"}}, "duration"),
        ({"Name": "a", "Port": 1, "Check": {"TTL": "100ms"}}, "outside"),
        ({"Name": "a", "Port": 1, "Check": {"TTL": "5s", "Status": "up"}}, "Status"),
        ({"Name": "a", "Port": 1, "Check": {}}, "TTL"),
        ({"Name": "a", "Port": 1, "Check": {"TTL": "5s"}, "Checks": [{"TTL": "5s"}]}, "one check"),
        ({"Name": "a", "Port": 1, "Weights": {"Passing": 2, "Warning": 2}}, "Warning"),
        ({"Name": "a", "Port": 1, "Kind": "connect-proxy"}, "not supported"),
        ({"Name": "a", "Port": 1, "Namespace": "team"}, "not supported"),
    ],
)
def test_bad_registrations(body: Any, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        writes.parse_registration(body, "h")


@pytest.mark.parametrize(
    ("body", "message"),
    [(b"{", "not valid JSON"), (b"\xff", "UTF-8"), (b"[" * 100_000, "nests"),
     (b" " * (writes.BODY_BYTES_MAX + 1), "at most")],
)
def test_bad_json_bodies(body: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        writes.decode_json(body)


def test_check_update() -> None:
    assert writes.parse_check_update({"Status": "warning", "Output": "hm"}) == writes.CheckUpdate("warning", "hm")
    bads: list[Any] = [{"Status": "ok"}, {"Status": "passing", "Output": 3}, [], {"Status": "passing", "X": 1}]
    for bad in bads:
        with pytest.raises(BadRequest):
            writes.parse_check_update(bad)
