"""ACLs, login, intentions and Raft-port hardening on real node processes (``regctl server --acl``)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from registry.client import SyncClient
from registry.errors import Conflict, LimitExceeded, PermissionDenied, RegistryError, Unauthenticated
from tests.support.cluster import Cluster, regctl_executable, wait_until

pytestmark = pytest.mark.integration


def regctl(cluster: Cluster, *args: str, token: str | None = None, stdin: str | None = None,
           endpoints: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "REGCTL_TOKEN"}
    if token is not None:
        env["REGCTL_TOKEN"] = token
    cmd = [regctl_executable(), "--endpoints", ",".join(endpoints or cluster.endpoints), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False, input=stdin, env=env)


def bootstrap(cluster: Cluster) -> str:
    proc = regctl(cluster, "-o", "json", "acl", "bootstrap")
    assert proc.returncode == 0, proc.stderr
    secret: str = json.loads(proc.stdout)["secret"]
    return secret


def make_token(client: SyncClient, role: str, rules: list[str]) -> dict[str, Any]:
    client.call("acl_role_put", {"name": role, "rules": rules})
    _, body = client.call("acl_token_create", {"roles": [role], "description": role})
    assert isinstance(body, dict)
    return body


def test_acl_end_to_end(acl_cluster: Cluster) -> None:
    c = acl_cluster
    # Anonymous: nothing but status and bootstrap.
    anon = c.client()
    with pytest.raises(Unauthenticated):
        anon.register("web", "w1", "10.0.0.1", 80)
    with pytest.raises(Unauthenticated):
        anon.call("service_list", {})
    with pytest.raises(Unauthenticated):
        anon.lease_grant(5000)
    with pytest.raises(Unauthenticated):
        c.client(token="not-a-real-token").call("key_get", {"key": "x"})

    text = regctl(c, "acl", "bootstrap")
    assert text.returncode == 0, text.stderr
    assert "This is the only time this management token is shown; store it now." in text.stdout
    secret = next(line.split(": ", 1)[1] for line in text.stdout.splitlines() if line.startswith("secret: "))
    again = regctl(c, "acl", "bootstrap")
    assert again.returncode == 1 and "CONFLICT" in again.stderr
    with pytest.raises(Conflict):
        anon.call("acl_bootstrap", {})

    admin = c.client(token=secret)
    admin.register("web", "w1", "10.0.0.1", 80)
    admin.register("db", "d1", "10.0.0.2", 5432)
    # With ACLs on, keepalives take the authorized (task) path instead of the inline one.
    admin_lease = admin.lease_grant(60_000)
    assert admin.lease_keepalive_many([admin_lease, 424242]) == {"renewed": 1, "ttl_ms": [60_000, 0],
                                                                 "missing": [424242]}

    # Read-only token.
    ro = make_token(admin, "ro", ["service:*=read", "key:=read", "lease=read"])
    reader = c.client(token=ro["secret"])
    assert reader.get_service("web")[1]["service"]["name"] == "web"
    for attempt in (
        lambda: reader.register("web", "w2", "10.0.0.3", 80),
        lambda: reader.deregister("web", "w1"),
        lambda: reader.lease_grant(5000),
        lambda: reader.lease_keepalive_many([admin_lease]),
        lambda: reader.call("acl_role_put", {"name": "x", "rules": []}),
        lambda: reader.call("acl_token_create", {"roles": ["ro"]}),
        lambda: reader.call("acl_token_list", {}),
    ):
        with pytest.raises(PermissionDenied):
            attempt()

    # Scoped to web*: may register web-ish services, not db; lists are filtered.
    web = make_token(admin, "web", ["service:web*=read,register"])
    webc = c.client(token=web["secret"])
    webc.register("web-api", "a1", "10.0.0.4", 80)
    with pytest.raises(PermissionDenied):
        webc.register("db", "d2", "10.0.0.5", 5432)
    with pytest.raises(PermissionDenied):
        webc.deregister("db", "d1")
    with pytest.raises(PermissionDenied):
        webc.get_service("db")
    _, names = webc.call("service_list", {})
    assert sorted(s["name"] for s in names) == ["web", "web-api"]

    # A web* watch stream: sees web events only, ends when the token is revoked.
    items: list[Any] = []
    errors: list[BaseException] = []

    def watch() -> None:
        w = SyncClient(c.endpoints[2:], token=web["secret"], timeout_s=10.0)
        try:
            for item in w.watch(all=True, progress_ms=200):
                items.append(item)
        except RegistryError as err:
            errors.append(err)
        finally:
            w.close()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    wait_until(lambda: items, 10.0, "watch created")
    admin.register("db", "d3", "10.0.0.6", 5432)
    admin.register("web", "w9", "10.0.0.7", 80)
    wait_until(lambda: any(i.get("type") == "events" for i in items), 10.0, "web event")
    seen = [e for i in items if i.get("type") == "events" for e in i["events"]]
    assert {e["service"] for e in seen if e["kind"] in ("service", "instance")} == {"web"}

    # Revoke: the very next request on every node fails, and the watch ends.
    admin.call("acl_token_delete", {"token_id": web["id"]})
    for node in c.nodes:
        with SyncClient([node.api], token=web["secret"], timeout_s=5.0) as one:
            with pytest.raises(Unauthenticated):
                one.get_service("web")
    thread.join(10.0)
    assert not thread.is_alive() and errors and isinstance(errors[0], Unauthenticated)

    # CLI: token list shows no secrets; intentions round trip.
    listed = regctl(c, "-o", "json", "acl", "token", "list", token=secret)
    assert listed.returncode == 0 and secret not in listed.stdout and "secret_hash" not in listed.stdout
    assert regctl(c, "intention", "deny", "web", "db", token=secret).returncode == 0
    check = regctl(c, "intention", "check", "web", "db", token=secret)
    assert check.returncode == 1 and check.stdout.startswith("deny")
    assert regctl(c, "intention", "check", "web", "db", token=ro["secret"]).returncode == 1  # no read on intention

    # The HTTP JSON endpoints need a bearer token too.
    url = f"http://{c.nodes[0].http}/v1/services"
    with pytest.raises(urllib.error.HTTPError) as http_err:
        urllib.request.urlopen(url, timeout=5)
    assert http_err.value.code == 401
    http_err.value.close()
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {secret}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        assert {s["name"] for s in json.loads(response.read())} >= {"web", "db"}

    # Denials are audited and counted.
    log = c.logs()
    assert "DENIED" in log and "ACL CHANGE" in log
    metrics = ""
    for node in c.nodes:
        with urllib.request.urlopen(f"http://{node.http}/metrics", timeout=5) as response:
            metrics += response.read().decode()
    assert 'regctl_acl_denials_total{reason="permission_denied"}' in metrics
    assert 'regctl_acl_denials_total{reason="unauthenticated"}' in metrics


def test_login_rate_limited_and_logged(acl_cluster: Cluster) -> None:
    c = acl_cluster
    secret = bootstrap(c)
    one = [c.nodes[0].api]
    admin = c.client(token=secret)
    admin.call("acl_role_put", {"name": "ops", "rules": ["service:*=read"]})
    made = regctl(c, "acl", "user", "create", "ann", "--role", "ops", "--password-stdin", token=secret,
                  stdin="correct horse battery\n")
    assert made.returncode == 0, made.stderr
    good = regctl(c, "-o", "json", "login", "ann", "--password-stdin", stdin="correct horse battery\n", endpoints=one)
    assert good.returncode == 0, good.stderr
    token = json.loads(good.stdout)["secret"]
    with pytest.raises(RegistryError) as info:
        c.client(token=token).get_service("missing")
    assert info.value.code == "NOT_FOUND"  # authenticated and allowed to read; the service is just absent

    anon = SyncClient(one, timeout_s=5.0)
    try:
        for _ in range(5):
            with pytest.raises(Unauthenticated):
                anon.call("login", {"name": "ann", "password": "wrong password"})
        with pytest.raises(LimitExceeded):
            anon.call("login", {"name": "ann", "password": "correct horse battery"})
    finally:
        anon.close()
    assert c.logs().count("LOGIN FAILED user=ann") >= 5


def test_raft_port_garbage_and_wrong_key(acl_cluster: Cluster, tmp_path: Path) -> None:
    c = acl_cluster
    secret = bootstrap(c)
    admin = c.client(token=secret)
    admin.register("web", "w1", "10.0.0.1", 80)
    before = admin.call("service_dump", {})[1]
    for node in c.nodes:
        host, port = node.raft.rsplit(":", 1)
        for payload in (os.urandom(4096), b"\x00" * 100, b"GET / HTTP/1.1\r\n\r\n", os.urandom(65536)):
            try:
                with socket.create_connection((host, int(port)), timeout=2.0) as sock:
                    sock.sendall(payload)
                    time.sleep(0.05)
            except OSError:
                pass
    # A rogue node with the wrong cluster key, peering with every member.
    rogue_dir = tmp_path / "rogue"
    rogue_dir.mkdir()
    key_file = rogue_dir / "key"
    key_file.write_text("a-completely-different-key-0123")
    rogue_raft = f"127.0.0.1:{c.base + 99}"
    rogue = subprocess.Popen(
        [regctl_executable(), "server", "--id", "rogue", "--data-dir", str(rogue_dir / "data"), "--raft", rogue_raft,
         "--peers", ",".join(n.raft for n in c.nodes), "--api", f"127.0.0.1:{c.base + 98}",
         "--http", f"127.0.0.1:{c.base + 97}", "--cluster-key-file", str(key_file)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(3.0)  # the fault itself: the rogue peer keeps trying to join for this long
    finally:
        rogue.kill()
        rogue.wait()
    for node in c.nodes:
        assert node.proc is not None and node.proc.poll() is None, f"{node.node_id} died"
    admin.register("web", "w2", "10.0.0.2", 80)
    after = admin.call("service_dump", {})[1]
    assert [i["id"] for i in after[0]["instances"]] == ["w1", "w2"]
    assert before[0]["instances"][0] == after[0]["instances"][0]


def test_cli_acl_commands(acl_cluster: Cluster) -> None:
    c = acl_cluster
    secret = bootstrap(c)

    def ok(*args: str, token: str | None = secret, stdin: str | None = None) -> str:
        proc = regctl(c, *args, token=token, stdin=stdin)
        assert proc.returncode == 0, f"{args}: {proc.stderr}"
        return proc.stdout

    ok("acl", "role", "create", "web", "--rule", "service:web*=read,register", "--rule", "lease=write")
    roles = json.loads(ok("-o", "json", "acl", "role", "list"))
    assert roles == [{"name": "web", "rules": [{"resource": "service:web*", "verbs": ["read", "register"]},
                                               {"resource": "lease", "verbs": ["write"]}]}]
    bad = regctl(c, "acl", "role", "create", "x", "--rule", "db=read", token=secret)
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr
    made = json.loads(ok("-o", "json", "acl", "token", "create", "--role", "web", "--ttl", "1h",
                         "--description", "ci"))
    assert made["expires_ms"] is not None
    web = made["secret"]
    ok("service", "register", "web-1", "--address", "10.0.0.1:80", "--ttl", "10s", token=web)
    denied = regctl(c, "service", "register", "db", "--address", "10.0.0.2:5432", token=web)
    assert denied.returncode == 1 and "PERMISSION_DENIED" in denied.stderr
    anonymous = regctl(c, "service", "list")
    assert anonymous.returncode == 1 and "UNAUTHENTICATED" in anonymous.stderr
    tokens = json.loads(ok("-o", "json", "acl", "token", "list"))
    assert {t["id"] for t in tokens} >= {made["id"]} and all("secret" not in json.dumps(t) for t in tokens)
    ok("acl", "token", "revoke", made["id"])
    after = regctl(c, "service", "list", token=web)
    assert after.returncode == 1 and "UNAUTHENTICATED" in after.stderr
    ok("acl", "user", "create", "bob", "--role", "web", "--password-stdin", stdin="hunter2hunter2\n")
    assert json.loads(ok("-o", "json", "acl", "user", "list")) == [{"name": "bob", "roles": ["web"]}]
    wrong = regctl(c, "login", "bob", "--password-stdin", stdin="nope-nope\n")
    assert wrong.returncode == 1 and "UNAUTHENTICATED" in wrong.stderr
    ok("intention", "deny", "web", "db")
    listed = json.loads(ok("-o", "json", "intention", "list"))
    assert listed == {"default": "allow", "intentions": [{"source": "web", "destination": "db", "action": "deny"}]}
    ok("intention", "delete", "web", "db")
    assert ok("intention", "check", "web", "db").startswith("allow")
    ok("acl", "role", "delete", "web")
    ok("acl", "user", "delete", "bob")
