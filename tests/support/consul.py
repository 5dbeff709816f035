"""A test cluster that also speaks Consul's HTTP API, and a tiny HTTP helper for it."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import consul
import pytest

from registry.server.ports import ports_free
from tests.support.cluster import Cluster, NodeProc


class ConsulCluster(Cluster):
    """A cluster whose node i also serves Consul's HTTP API on base + 300 + i (as ``regctl up`` does)."""

    def __init__(self, root: Path, size: int = 3, **kwargs: Any) -> None:
        self._consul_clients: list[consul.Consul] = []
        for _ in range(20):
            super().__init__(root, size, **kwargs)
            if ports_free([self.consul_port(n) for n in self.nodes]):
                return
        raise RuntimeError("no free ports for the Consul listeners")

    def consul_port(self, node: NodeProc) -> int:
        return self.base + 300 + int(node.node_id[1:])

    def command(self, node: NodeProc) -> list[str]:
        return [*super().command(node), "--consul-http", f"127.0.0.1:{self.consul_port(node)}"]

    def consul(self, node: NodeProc, **kwargs: Any) -> consul.Consul:
        """A py-consul client for ``node``; closed with the cluster (its requests session holds sockets)."""
        client = consul.Consul(host="127.0.0.1", port=self.consul_port(node), **kwargs)
        self._consul_clients.append(client)
        return client

    def close(self) -> None:
        for client in self._consul_clients:
            client.http.close()
        self._consul_clients.clear()
        super().close()

    def url(self, node: NodeProc, path: str) -> str:
        return f"http://127.0.0.1:{self.consul_port(node)}{path}"


def http(method: str, url: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request; (status, headers, body) whatever the status."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def started_consul_cluster(root: Path, request: pytest.FixtureRequest,
                           extra_args: tuple[str, ...] = ()) -> Iterator[ConsulCluster]:
    """The body of a fixture: a started cluster with a leader; logs printed if the test failed; always closed."""
    from tests.conftest import _print_logs_if_failed

    c = ConsulCluster(root, 3, extra_args=extra_args)
    try:
        c.start()
        c.wait_leader()
        yield c
    finally:
        _print_logs_if_failed(request, c.logs)
        c.close()
