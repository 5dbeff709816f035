"""The client API over TLS, with and without required client certificates (a real node process)."""

from __future__ import annotations

import gc
import os
import socket
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from registry.client import SyncClient, client_ssl_context
from registry.errors import RegistryError
from registry.server.ports import free_ports
from tests.support.cluster import regctl_executable, wait_until

pytestmark = pytest.mark.integration


def make_cert(root: Path, name: str, ca: tuple[Path, Path] | None = None) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (or one signed by ``ca``); returns (cert, key)."""
    cert, key = root / f"{name}.pem", root / f"{name}.key"
    ext = root / f"{name}.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:TRUE\n")
    if ca is None:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                        f"/CN={name}", "-keyout", str(key), "-out", str(cert), "-addext",
                        "subjectAltName=IP:127.0.0.1", "-addext", "basicConstraints=critical,CA:TRUE"],
                       check=True, capture_output=True)
    else:
        csr = root / f"{name}.csr"
        subprocess.run(["openssl", "req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                        "-keyout", str(key), "-out", str(csr)], check=True, capture_output=True)
        subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
                        "-CAcreateserial", "-days", "2", "-out", str(cert)], check=True, capture_output=True)
    return cert, key


@pytest.fixture
def tls_node(tmp_path: Path) -> Iterator[tuple[str, Path, Path, Path]]:
    ca_cert, ca_key = make_cert(tmp_path, "ca")
    client_cert, client_key = make_cert(tmp_path, "client", (ca_cert, ca_key))
    api, raft, http = free_ports(3)
    with open(tmp_path / "node.log", "wb") as log:
        proc = subprocess.Popen(
            [regctl_executable(), "server", "--id", "t1", "--data-dir", str(tmp_path / "data"), "--raft",
             f"127.0.0.1:{raft}", "--api", f"127.0.0.1:{api}", "--http", f"127.0.0.1:{http}", "--dev",
             "--tls-cert", str(ca_cert), "--tls-key", str(ca_key), "--tls-client-ca", str(ca_cert)],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        yield f"127.0.0.1:{api}", ca_cert, client_cert, client_key
    finally:
        proc.kill()
        proc.wait()


# Refused handshakes and connects cancelled by the client's connect timeout make asyncio drop
# half-open sockets for the garbage collector to close (a CPython 3.11 wart, not a leak of ours).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_tls_api_requires_client_certificate(tls_node: tuple[str, Path, Path, Path]) -> None:
    endpoint, ca, cert, key = tls_node
    good = client_ssl_context(str(ca), str(cert), str(key))

    def write() -> bool:
        with SyncClient([endpoint], timeout_s=2.0, connect_timeout_s=1.0, ssl_context=good) as c:
            c.call("key_put", {"key": "tls/k", "value": "v"})
            return True

    wait_until(write, 20, "a write over TLS")
    # Without a client certificate, or without TLS at all, the node does not serve.
    no_cert = client_ssl_context(str(ca))
    for kwargs in ({"ssl_context": no_cert}, {}):
        with SyncClient([endpoint], timeout_s=1.5, connect_timeout_s=0.5, **kwargs) as c:
            with pytest.raises((RegistryError, OSError)):
                c.call("key_get", {"key": "tls/k"})
    # The raw port does not speak plaintext.
    host, port = endpoint.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=2) as sock:
        sock.sendall(b"\x00" * 64)
        sock.settimeout(2)
        try:
            data = sock.recv(100)
        except OSError:
            data = b""
    assert b"t1" not in data
    # The CLI passes the same settings.
    proc = subprocess.run([regctl_executable(), "--endpoints", endpoint, "--tls-ca", str(ca), "--tls-cert", str(cert),
                           "--tls-key", str(key), "status"], capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    # Collect those dropped sockets now, under this test's filter, not in the next test's setup.
    gc.collect()


def test_unreadable_or_bad_tls_files_are_usage_errors(tmp_path: Path) -> None:
    """A missing or non-PEM file: exit 2 and one line naming the flags, from the server and from the CLI."""
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    missing = tmp_path / "missing.pem"
    api, raft, http = free_ports(3)
    server = [regctl_executable(), "server", "--id", "t1", "--data-dir", str(tmp_path / "data"), "--raft",
              f"127.0.0.1:{raft}", "--api", f"127.0.0.1:{api}", "--http", f"127.0.0.1:{http}", "--dev"]
    cases = [
        ([*server, "--tls-cert", str(junk), "--tls-key", str(junk)], "cannot load TLS files (--tls-cert"),
        ([regctl_executable(), "--endpoints", f"127.0.0.1:{api}", "--tls-ca", str(junk), "status"],
         "cannot load TLS files (--tls-ca"),
    ]
    for cmd, message in cases:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and message in proc.stderr, (cmd, proc.returncode, proc.stderr)
        assert "Traceback" not in proc.stderr
    # click checks that a path exists (dir_okay=False paths): still exit 2, with click's message.
    proc = subprocess.run([*server, "--tls-cert", str(missing), "--tls-key", str(junk)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # as above
def test_the_agent_talks_to_the_registry_over_tls(tls_node: tuple[str, Path, Path, Path], tmp_path: Path) -> None:
    # Issue #20, finding 6. Before, `regctl agent` ignored --tls-*: against a TLS-only node it never registered (and
    # against a plaintext one it sent its token in clear).
    endpoint, ca, cert, key = tls_node
    good = client_ssl_context(str(ca), str(cert), str(key))
    backend_port, http_port = free_ports(2)
    with open(tmp_path / "agent.log", "wb") as log:
        agent = subprocess.Popen(
            [regctl_executable(), "--endpoints", endpoint, "--tls-ca", str(ca), "--tls-cert", str(cert),
             "--tls-key", str(key), "agent", "--service", "web", "--id", "w1", "--address",
             f"127.0.0.1:{backend_port}", "--ttl", "5s", "--http", f"127.0.0.1:{http_port}"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        def registered() -> bool:
            with SyncClient([endpoint], timeout_s=2.0, connect_timeout_s=1.0, ssl_context=good) as c:
                _, service = c.get_service("web")
                return [i["id"] for i in service["instances"]] == ["w1"]

        wait_until(registered, 30, "the agent to register over TLS")
    finally:
        agent.kill()
        agent.wait()
        gc.collect()  # the half-open sockets of attempts before the node listened: closed under the filter


def test_http_endpoints_serve_tls_with_their_own_certificate(tmp_path: Path) -> None:
    # Issue #20, finding 6: the HTTP endpoints take Bearer tokens but could not serve TLS.
    cert, key = make_cert(tmp_path, "http")
    api, raft, http = free_ports(3)
    with open(tmp_path / "node.log", "wb") as log:
        proc = subprocess.Popen(
            [regctl_executable(), "server", "--id", "t1", "--data-dir", str(tmp_path / "data"), "--raft",
             f"127.0.0.1:{raft}", "--api", f"127.0.0.1:{api}", "--http", f"127.0.0.1:{http}", "--dev",
             "--http-tls-cert", str(cert), "--http-tls-key", str(key)],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        trusted = ssl.create_default_context(cafile=str(cert))

        def metrics_over_tls() -> bool:
            with urllib.request.urlopen(f"https://127.0.0.1:{http}/metrics", timeout=2, context=trusted) as r:
                return b"regctl_revision" in r.read()

        wait_until(metrics_over_tls, 20, "/metrics over TLS")
        with pytest.raises(OSError):  # plaintext HTTP is not served on that port
            urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=2).read()
    finally:
        proc.kill()
        proc.wait()


def test_consul_http_api_serves_tls_with_its_own_certificate(tmp_path: Path) -> None:
    # Issue #20, finding 6, for the Consul API: it takes tokens (X-Consul-Token, ?token=) and served plaintext only.
    import consul
    import requests

    cert, key = make_cert(tmp_path, "consul")
    api, raft, http, consul_port = free_ports(4)
    with open(tmp_path / "node.log", "wb") as log:
        proc = subprocess.Popen(
            [regctl_executable(), "server", "--id", "t1", "--data-dir", str(tmp_path / "data"), "--raft",
             f"127.0.0.1:{raft}", "--api", f"127.0.0.1:{api}", "--http", f"127.0.0.1:{http}", "--dev",
             "--consul-http", f"127.0.0.1:{consul_port}",
             "--consul-http-tls-cert", str(cert), "--consul-http-tls-key", str(key)],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        # Consul's own client, told to trust the certificate: registers and reads back over TLS.
        client = consul.Consul(host="127.0.0.1", port=consul_port, scheme="https", verify=str(cert))

        def leader_known() -> bool:
            try:
                return bool(client.status.leader())
            except (requests.RequestException, consul.ConsulException):
                return False

        wait_until(leader_known, 30, "the Consul API over TLS")
        assert client.agent.service.register("web", service_id="web-1", address="10.0.0.1", port=80)
        _index, nodes = client.catalog.service("web")
        assert [n["ServiceID"] for n in nodes] == ["web-1"]
        # A client that does not trust it refuses, and plaintext HTTP is not answered on that port.
        untrusting = consul.Consul(host="127.0.0.1", port=consul_port, scheme="https", verify=True)
        with pytest.raises(requests.exceptions.SSLError):
            untrusting.status.leader()
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{consul_port}/v1/status/leader", timeout=2).read()
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--consul-http-tls-cert", "c.pem"), "go together"),
        (("--consul-http-tls-cert", "c.pem", "--consul-http-tls-key", "k.pem"), "needs --consul-http"),
        (("--consul-http", "127.0.0.1:1", "--consul-http-tls-cert", "missing.pem", "--consul-http-tls-key",
          "missing.key"), "cannot load TLS files (--consul-http-tls-cert/--consul-http-tls-key)"),
    ],
)
def test_consul_tls_flags_are_checked_before_start(tmp_path: Path, flags: tuple[str, ...], message: str) -> None:
    result = subprocess.run([regctl_executable(), "server", "--id", "n1", "--data-dir", str(tmp_path / "d"),
                             "--raft", "127.0.0.1:1", "--dev", *flags], capture_output=True, text=True, timeout=60,
                            cwd=tmp_path)
    assert result.returncode == 2, result
    assert message in result.stderr
