"""Fuzz a real node's HTTP endpoints (issue #20): odd paths, queries, methods and tokens.

A single node process with ``--acl``; hypothesis sends requests built from
the real routes with random parts.  No answer may be a 500, and the node
must stay up and answer ``/healthz`` afterwards.  Slow-marked, like the rest
of tests/fuzz; ``FUZZ_EXAMPLES`` sets the examples.
"""

from __future__ import annotations

import http.client
import os
import subprocess
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from registry.server.ports import free_ports
from tests.fuzz.campaign import EXAMPLES, for_a_while
from tests.support.cluster import regctl_executable, wait_until

pytestmark = pytest.mark.slow


ROUTES = ["/metrics", "/healthz", "/readyz", "/v1/status", "/v1/services", "/v1/services/{}", "/v1/sd", "/{}"]
texts = st.text(max_size=30)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    root: Path = tmp_path_factory.mktemp("fuzz-http")
    api, raft, port = free_ports(3)
    with open(root / "node.log", "wb") as log:
        proc = subprocess.Popen(
            [regctl_executable(), "server", "--id", "f1", "--data-dir", str(root / "data"), "--raft",
             f"127.0.0.1:{raft}", "--api", f"127.0.0.1:{api}", "--http", f"127.0.0.1:{port}", "--dev", "--acl"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_until(lambda: _get("127.0.0.1", port, "GET", "/healthz", {})[0] == 200, 20, "the node's /healthz")
        yield "127.0.0.1", port
    finally:
        proc.kill()
        proc.wait()
        assert proc.returncode is not None


def _get(host: str, port: int, method: str, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.mark.slow
@for_a_while
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    route=st.sampled_from(ROUTES),
    segment=texts,
    query=st.dictionaries(st.sampled_from(["consistency", "index", "wait", "passing", "tag", "x"]), texts,
                          max_size=3),
    method=st.sampled_from(["GET", "HEAD", "POST", "DELETE"]),
    token=st.one_of(st.none(), texts.filter(lambda t: t.isprintable() and "\r" not in t and "\n" not in t)),
)
# Found by this test: a Bearer token with a byte that is not UTF-8 made every endpoint answer 500.
@example(route="/v1/status", segment="", query={}, method="GET", token="\u00a1")
def test_http_endpoints_answer_without_5xx(node: tuple[str, int], route: str, segment: str,
                                           query: dict[str, str], method: str, token: str | None) -> None:
    host, port = node
    path = route.format(urllib.parse.quote(segment, safe=""))
    if query:
        path += "?" + urllib.parse.urlencode(query)
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    try:
        status, _ = _get(host, port, method, path, headers)
    except UnicodeEncodeError:
        return  # http.client refuses a non-latin-1 header itself: nothing was sent
    # 503 is /readyz's answer while not ready; every other 5xx is a bug.
    assert status < 500 or (status == 503 and route == "/readyz"), (method, path, status)
    assert _get(host, port, "GET", "/healthz", {})[0] == 200
