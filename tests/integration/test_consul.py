"""Consul's HTTP API on real nodes, spoken to by Consul's own Python client (py-consul) and raw HTTP."""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Iterator
from pathlib import Path

import consul
import pytest

from tests.support.cluster import wait_until
from tests.support.consul import ConsulCluster, http, started_consul_cluster
from tests.support.up import UpRun, free_up_base_port


@pytest.fixture
def ccluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ConsulCluster]:
    yield from started_consul_cluster(tmp_path / "cluster", request)


def test_register_ttl_pass_and_deregister_with_py_consul(ccluster: ConsulCluster) -> None:
    leader = ccluster.wait_leader()
    n1 = leader
    follower = next(n for n in ccluster.nodes if n is not leader)
    c = ccluster.consul(n1)
    assert c.agent.service.register("web", service_id="web-1", address="10.0.0.7", port=8080,
                                    tags=["traefik.http.routers.w.rule=Host(`e.test`) && PathPrefix(`/b`)"],
                                    meta={"version": "1"}, check=consul.Check.ttl("30s"))
    _, entries = c.health.service("web")
    (entry,) = entries
    assert entry["Service"]["ID"] == "web-1" and entry["Service"]["Port"] == 8080
    assert entry["Service"]["Tags"] == ["traefik.http.routers.w.rule=Host(`e.test`) && PathPrefix(`/b`)"]
    (check,) = entry["Checks"]
    assert check["CheckID"] == "service:web-1" and check["Status"] == "critical"  # Consul's default for TTL checks
    assert c.health.service("web", passing=True)[1] == []
    # A TTL pass through a follower renews the lease at the leader (keepalives are leader-local).
    other = ccluster.consul(follower)
    assert other.agent.check.ttl_pass("service:web-1", notes="all good")
    _, passing = c.health.service("web", passing=True)
    assert [e["Service"]["ID"] for e in passing] == ["web-1"]
    assert passing[0]["Checks"][0]["Output"] == "all good"
    _, services = c.catalog.services()
    assert services == {"web": ["traefik.http.routers.w.rule=Host(`e.test`) && PathPrefix(`/b`)"]}
    _, catalog_entries = c.catalog.service("web")
    assert catalog_entries[0]["ServiceAddress"] == "10.0.0.7" and catalog_entries[0]["ServiceMeta"] == {"version": "1"}
    assert c.agent.check.ttl_warn("service:web-1", notes="slow")
    assert c.health.service("web")[1][0]["Checks"][0]["Status"] == "warning"
    assert c.agent.service.deregister("web-1")
    assert c.health.service("web")[1] == []
    # An unknown service answers 200 [] with an index, as Consul does.
    index, none = c.health.service("nothing-here")
    assert none == [] and int(index) >= 1


def test_blocking_query_waits_for_its_own_answer(ccluster: ConsulCluster) -> None:
    n1 = ccluster.nodes[0]
    c = ccluster.consul(n1)
    c.agent.service.register("api", service_id="api-1", address="10.0.0.1", port=80)
    index, _ = c.health.service("api")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        blocked = pool.submit(c.health.service, "api", index=index, wait="60s")
        # A change elsewhere: applied on this node (its own read shows it), and the query still waits.
        c.agent.service.register("other", service_id="other-1", address="10.0.0.2", port=81)
        wait_until(lambda: "other" in c.catalog.services(consistency="stale")[1], 10, "the change applied")
        assert not blocked.done()
        assert c.health.service("api")[0] == index  # the index did not move either
        # A change to its answer wakes it, with a higher index.
        c.agent.service.register("api", service_id="api-2", address="10.0.0.3", port=80)
        new_index, entries = blocked.result(timeout=30)
    assert int(new_index) > int(index)
    assert sorted(e["Service"]["ID"] for e in entries) == ["api-1", "api-2"]
    # A delete moves the index too (no record left in the answer says so).
    c.agent.service.deregister("api-2")
    after_delete, _ = c.health.service("api")
    assert int(after_delete) > int(new_index)
    # A wait that runs out returns the same index.
    timed_out, _ = c.health.service("api", index=after_delete, wait="1s")
    assert timed_out == after_delete
    # An index ahead of the answer's answers at once.
    ahead, _ = c.health.service("api", index=str(int(after_delete) + 1000), wait="60s")
    assert ahead == after_delete


def test_kv_get_put_cas_recurse(ccluster: ConsulCluster) -> None:
    c = ccluster.consul(ccluster.nodes[0])
    assert c.kv.put("app/config/a", "1")
    assert c.kv.put("app/config/b", "two")
    index, item = c.kv.get("app/config/a")
    assert item["Value"] == b"1"
    # cas: a stale ModifyIndex loses, the current one wins, 0 means "only if absent".
    assert not c.kv.put("app/config/a", "x", cas=item["ModifyIndex"] - 1)
    assert c.kv.put("app/config/a", "x", cas=item["ModifyIndex"])
    assert not c.kv.put("app/config/a", "y", cas=0)
    assert c.kv.put("app/config/c", "new", cas=0)
    _, items = c.kv.get("app/", recurse=True)
    assert [(i["Key"], i["Value"]) for i in items] == [("app/config/a", b"x"), ("app/config/b", b"two"),
                                                      ("app/config/c", b"new")]
    _, keys = c.kv.get("app/", keys=True, separator="/")
    assert keys == ["app/config/"]
    assert c.kv.get("missing")[1] is None
    assert c.kv.delete("app/config/c")
    _, items = c.kv.get("app/", recurse=True)
    assert [i["Key"] for i in items] == ["app/config/a", "app/config/b"]
    # A blocking KV read wakes on a put under its prefix.
    index, _ = c.kv.get("app/", recurse=True)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        blocked = pool.submit(c.kv.get, "app/", recurse=True, index=index, wait="60s")
        c.kv.put("app/config/d", "4")
        new_index, items = blocked.result(timeout=30)
    assert int(new_index) > int(index) and len(items) == 3
    status, _, body = http("GET", ccluster.url(ccluster.nodes[0], "/v1/kv/app/config/b?raw"))
    assert (status, body) == (200, b"two")


#: (method, path, body, expected status, a piece of the message): each refused, none changing anything.
BAD_INPUT: list[tuple[str, str, bytes | None, int, bytes]] = [
    ("PUT", "/v1/agent/service/register", b"{not json", 400, b"not valid JSON"),
    ("PUT", "/v1/agent/service/register", b'{"Name": 5, "Port": 1}', 400, b"Name must be a string"),
    ("PUT", "/v1/agent/service/register", b'{"Name": "a", "Port": "80"}', 400, b"Port must be an integer"),
    ("PUT", "/v1/agent/service/register", b'{"Name": "a b", "Port": 80}', 400, b"not a valid name"),
    ("PUT", "/v1/agent/service/register", b'{"Name": "a", "Port": 80, "Tags": ["x\\u0007"]}', 400, b"tag"),
    ("PUT", "/v1/agent/service/register", b" " * ((1 << 20) + 1), 413, b"size"),
    ("PUT", "/v1/kv/k", b"x" * ((1 << 20) + 1), 413, b"size"),
    ("GET", "/v1/no/such/path", None, 404, b"Not Found"),
    ("GET", "/v1/health/service/web?wait=5", None, 400, b"duration"),
    ("GET", "/v1/health/service/web?wait=forever", None, 400, b"duration"),
    ("GET", "/v1/health/service/web?index=-1", None, 400, b"index"),
    ("GET", "/v1/health/service/web?index=abc", None, 400, b"index"),
    ("GET", "/v1/health/service/web?filter=Service.Port%3D%3D1", None, 400, b"filter"),
    ("GET", "/v1/catalog/services?near=_agent", None, 400, b"near"),
    ("GET", "/v1/catalog/service/web?node-meta=a:b", None, 400, b"node-meta"),
    ("GET", "/v1/catalog/service/web?peer=p", None, 400, b"peer"),
    ("GET", "/v1/catalog/service/web?ns=team", None, 400, b"ns"),
    ("GET", "/v1/health/state/sideways", None, 400, b"unknown check state"),
    ("PUT", "/v1/agent/check/pass/serfHealth", None, 404, b"service:<instance id>"),
    ("PUT", "/v1/agent/check/pass/service:nobody", None, 404, b"no instance"),
    ("PUT", "/v1/kv/with%20space", b"x", 400, b"not a valid key"),
    ("PUT", "/v1/kv/k?flags=3", b"x", 400, b"flags"),
    ("PUT", "/v1/kv/k", b"\xff\xfe", 400, b"UTF-8"),
    ("DELETE", "/v1/kv/app?recurse", None, 400, b"atomic"),
]


def test_bad_input_gets_4xx_and_the_node_keeps_serving(ccluster: ConsulCluster) -> None:
    node = ccluster.nodes[0]
    for method, path, body, status, message in BAD_INPUT:
        got, _, text = http(method, ccluster.url(node, path), body)
        assert got == status, (method, path, text)
        assert message.lower() in text.lower(), (method, path, text)
        ok, headers, services = http("GET", ccluster.url(node, "/v1/catalog/services"))
        assert ok == 200 and json.loads(services) == {} and int(headers["X-Consul-Index"]) >= 1
        assert headers["X-Consul-KnownLeader"] == "true"
    assert http("GET", ccluster.url(node, "/v1/kv/?recurse"))[0] == 404  # nothing was written


def test_acl_token_in_header_query_or_bearer(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    for c in started_consul_cluster(tmp_path / "acl", request, ("--acl",)):
        node = c.nodes[0]
        url = c.url(node, "/v1/catalog/services")
        assert http("GET", url)[0] == 403
        assert http("PUT", c.url(node, "/v1/kv/k"), b"v")[0] == 403
        secret = c.client().call("acl_bootstrap")[1]["secret"]
        assert http("GET", url, headers={"X-Consul-Token": secret})[0] == 200
        assert http("GET", url, headers={"Authorization": f"Bearer {secret}"})[0] == 200
        assert http("GET", url + "?token=" + secret)[0] == 200
        assert http("GET", url, headers={"X-Consul-Token": "wrong"})[0] == 403
        admin = c.consul(node, token=secret)
        assert admin.agent.service.register("web", service_id="w1", address="10.0.0.1", port=80)
        assert admin.agent.service.register("db", service_id="d1", address="10.0.0.2", port=5432)
        assert [e["Service"]["ID"] for e in admin.health.service("web")[1]] == ["w1"]
        # A token that may read only web: the same permissions as on the native API.
        with c.client(token=secret) as native:
            native.call("acl_role_put", {"name": "web-reader", "rules": ["service:web=read"]})
            reader_secret = native.call("acl_token_create", {"roles": ["web-reader"]})[1]["secret"]
        reader = c.consul(node, token=reader_secret)
        assert reader.catalog.services()[1] == {"web": []}
        assert [e["ServiceID"] for e in reader.catalog.service("web")[1]] == ["w1"]
        assert http("GET", c.url(node, "/v1/health/service/db"), headers={"X-Consul-Token": reader_secret})[0] == 403
        assert http("PUT", c.url(node, "/v1/agent/service/deregister/w1"),
                    headers={"X-Consul-Token": reader_secret})[0] == 403
        assert [e["Service"]["ID"] for e in admin.health.service("web")[1]] == ["w1"]  # the refusal changed nothing


def test_regctl_up_serves_consul_http_on_base_plus_300(tmp_path: Path) -> None:
    base = free_up_base_port()
    run = UpRun(tmp_path / "up-data", base, tmp_path / "up.log")
    clients = [consul.Consul(host="127.0.0.1", port=base + 300 + i) for i in range(1, 4)]
    try:
        wait_until(lambda: clients[0].status.leader(), 40, "a leader named on node 1's Consul port")
        assert clients[1].agent.service.register("web", service_id="w1", address="10.0.0.1", port=80)
        assert [e["Service"]["ID"] for e in clients[2].health.service("web")[1]] == ["w1"]
        assert f"http://127.0.0.1:{base + 301}" in run.output()
    finally:
        for client in clients:
            client.http.close()
        run.cleanup()


def test_a_stopping_node_answers_its_blocking_queries_and_exits(ccluster: ConsulCluster) -> None:
    node = ccluster.nodes[0]
    c = ccluster.consul(node)
    index, _ = c.catalog.services()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        blocked = pool.submit(c.catalog.services, index=index, wait="10m")
        wait_until(lambda: "regctl_consul_blocking_queries 1.0" in http("GET", f"http://{node.http}/metrics")[2].decode()
                   or None, 10, "the blocking query waiting on the hub")
        # Without releasing it, the listener's shutdown would wait for the ten-minute query.
        assert ccluster.stop(node) == 0
        assert blocked.result(timeout=5)[0] == index


def test_a_lapsed_ttl_removes_the_instance(ccluster: ConsulCluster) -> None:
    # Our lease semantics, documented in docs/consul.md: Consul would mark it critical instead.
    c = ccluster.consul(ccluster.nodes[0])
    assert c.agent.service.register("short", service_id="s1", address="10.0.0.9", port=9,
                                    check={"TTL": "1s", "Status": "passing"})
    assert [e["Service"]["ID"] for e in c.health.service("short", passing=True)[1]] == ["s1"]
    wait_until(lambda: c.health.service("short")[1] == [], 20, "the instance removed when its TTL lapsed")
    assert c.kv.get("anything")[1] is None  # the node is fine
