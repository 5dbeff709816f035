"""An agent enforcing intentions refuses proxied connections until it has loaded them (issue #20, finding 9).

Before, its table answered with the registry's default (allow) until the first
load, and for good when its token could not read intentions: a deny was
silently not enforced.  Here the client agent's token may read services but
not intentions, and the registry denies client -> echo.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from registry.server.ports import free_ports
from tests.support.agents import Proc, agent, ask, backend, port_open, upstream_view
from tests.support.cluster import Cluster, regctl_executable, wait_until

pytestmark = pytest.mark.integration


def refused(port: int) -> bool:
    try:
        ask(port, timeout_s=1.0)
    except OSError:
        return True
    return False


def test_an_agent_that_cannot_read_intentions_refuses_connections(acl_cluster: Cluster, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    c = acl_cluster
    boot = subprocess.run([regctl_executable(), "--endpoints", ",".join(c.endpoints), "-o", "json", "acl",
                           "bootstrap"], capture_output=True, text=True, timeout=60, check=True)
    admin = c.client(token=json.loads(boot.stdout)["secret"])
    admin.call("intention_put", {"source": "client", "destination": "echo", "action": "deny"})
    echo_port, proxy_port, http_port = free_ports(3)
    procs: list[Proc] = []
    try:
        procs.append(backend(tmp_path, "echo-1", echo_port).start())
        wait_until(lambda: port_open(echo_port), 10, "the backend to listen")
        admin.register("echo", "echo-1", "127.0.0.1", echo_port)
        admin.call("acl_role_put", {"name": "client-agent", "rules": ["service:*=read", "lease=write"]})
        _, token = admin.call("acl_token_create", {"roles": ["client-agent"]})
        monkeypatch.setenv("REGCTL_TOKEN", token["secret"])
        client = agent(tmp_path, "client", c.endpoints, "--name", "client", "--upstream",
                       f"echo={proxy_port}:round_robin", "--http", f"127.0.0.1:{http_port}").start()
        procs.append(client)
        wait_until(lambda: upstream_view(http_port)["healthy"] == 1, 30, "the client agent to see echo-1")
        assert refused(proxy_port), "a denied connection went through: intentions were not enforced"
        wait_until(lambda: "may not read intentions" in client.log(), 10, "the agent to say why")
        # Once the token may read intentions, the deny is what stops the connection; lifting it lets it through.
        admin.call("acl_role_put", {"name": "client-agent",
                                    "rules": ["service:*=read", "lease=write", "intention=read"]})
        admin.call("intention_delete", {"source": "client", "destination": "echo"})
        wait_until(lambda: not refused(proxy_port), 20, "the agent to load intentions and allow the pair")
        assert ask(proxy_port) == "echo-1"
    finally:
        for proc in procs:
            proc.kill()
