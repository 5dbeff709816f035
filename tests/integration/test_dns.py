"""DNS for services against a real three-node cluster (docs/dns.md).

Queries go through dnspython over real UDP and TCP sockets, through ``dig``
where it is installed, and through HAProxy's own resolver balancing real HTTP
backends found by SRV records.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import struct
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from registry.client import SyncClient
from tests.support.cluster import Cluster, NodeProc, wait_until

pytestmark = pytest.mark.integration


def _print_logs_if_failed(request: pytest.FixtureRequest, cluster: Cluster) -> None:
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(cluster.logs())


@contextlib.contextmanager
def _cluster(tmp_path: Path, request: pytest.FixtureRequest, *extra: str) -> Iterator[Cluster]:
    c = Cluster(tmp_path / "cluster", 3, extra_args=extra, dns=True)
    try:
        c.start()
        yield c
    finally:
        _print_logs_if_failed(request, c)
        c.close()


@pytest.fixture
def dns_cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    with _cluster(tmp_path, request) as c:
        yield c


def hostport(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host, int(port)


def ask(node: NodeProc, name: str, rdtype: str = "A", *, tcp: bool = False,
        payload: int | None = None) -> dns.message.Message:
    host, port = hostport(node.dns)
    query = dns.message.make_query(name, rdtype, use_edns=payload is not None, payload=payload or 512)
    if tcp:
        return dns.query.tcp(query, host, port=port, timeout=2.0)
    return dns.query.udp(query, host, port=port, timeout=2.0, ignore_trailing=False)


def answered(node: NodeProc, name: str) -> list[str]:
    """The A records ``node`` gives for ``name``, or [] while it does not answer (starting, restarting)."""
    try:
        return values(ask(node, name), "A")
    except dns.exception.Timeout:
        return []


def values(msg: dns.message.Message, rdtype: str) -> list[str]:
    kind = dns.rdatatype.from_text(rdtype)
    return sorted(rd.to_text() for rrset in msg.answer if rrset.rdtype == kind for rd in rrset)


def metric(node: NodeProc, name: str, label: str = "") -> float:
    with urllib.request.urlopen(f"http://{node.http}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and label in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_and_srv_answers_leave_critical_instances_out(dns_cluster: Cluster) -> None:
    client = dns_cluster.client()
    client.register("web", "w1", "10.0.0.1", 8001, tags=["v1"])
    client.register("web", "w2", "10.0.0.2", 8002, tags=["v2"])
    client.register("web", "w3", "10.0.0.3", 8003, tags=["v1"])
    client.register("v6svc", "x1", "2001:db8::7", 9000)
    every = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    # Stale reads: each node answers from its own applied state, so wait until every node has it.
    for node in dns_cluster.nodes:
        wait_until(lambda n=node: values(ask(n, "web.service.consul."), "A") == every, 10.0, f"A on {node.node_id}")
    node = dns_cluster.nodes[0]
    assert values(ask(node, "v1.web.service.consul."), "A") == ["10.0.0.1", "10.0.0.3"]
    assert values(ask(node, "v6svc.service.consul.", "AAAA"), "AAAA") == ["2001:db8::7"]
    srv = ask(node, "_web._tcp.service.consul.", "SRV")
    assert values(srv, "SRV") == ["1 1 8001 0a000001.addr.consul.", "1 1 8002 0a000002.addr.consul.",
                                  "1 1 8003 0a000003.addr.consul."]
    assert sorted(rd.to_text() for rrset in srv.additional for rd in rrset) == every
    assert all(rrset.ttl == 0 for rrset in (*srv.answer, *srv.additional))
    assert values(ask(node, "_web._v2.service.consul.", "SRV"), "SRV") == ["1 1 8002 0a000002.addr.consul."]

    client.set_status("web", "w2", "critical")
    for n in dns_cluster.nodes:
        wait_until(lambda n=n: values(ask(n, "web.service.consul."), "A") == ["10.0.0.1", "10.0.0.3"], 10.0,
                   f"w2 gone from {n.node_id}")
    assert "0a000002" not in str(ask(node, "web.service.consul.", "SRV", tcp=True))
    # The only v2 instance is critical: the name is gone, with the SOA for negative caching.
    gone = ask(node, "v2.web.service.consul.")
    assert gone.rcode() == dns.rcode.NXDOMAIN and gone.authority[0].rdtype == dns.rdatatype.SOA
    assert ask(node, "nothing.service.consul.").rcode() == dns.rcode.NXDOMAIN
    assert ask(node, "example.com.").rcode() == dns.rcode.REFUSED
    assert metric(node, "regctl_dns_queries_total", 'result="refused"') >= 1


def test_a_hundred_instances_truncate_over_udp_and_all_come_over_tcp(dns_cluster: Cluster) -> None:
    client = dns_cluster.client()
    for i in range(100):
        client.register("big", f"b{i:03d}", f"10.9.{i // 200}.{i % 200 + 1}", 7000 + i)
    node = dns_cluster.nodes[1]
    wait_until(lambda: len(values(ask(node, "big.service.consul.", tcp=True), "A")) == 100, 10.0, "100 instances")
    truncated = metric(node, "regctl_dns_truncated_total")
    fitted: dict[str, int] = {}
    for rdtype in ("A", "SRV"):
        udp = ask(node, "big.service.consul.", rdtype)
        assert udp.flags & dns.flags.TC
        fitted[rdtype] = len(values(udp, rdtype))
        assert 0 < fitted[rdtype] < 100
        tcp = ask(node, "big.service.consul.", rdtype, tcp=True)
        assert not tcp.flags & dns.flags.TC
        assert len(values(tcp, rdtype)) == 100
    # EDNS: a bigger buffer gets more records, still cut at our 1232-byte cap.
    edns = ask(node, "big.service.consul.", "A", payload=4096)
    assert edns.flags & dns.flags.TC and fitted["A"] < len(values(edns, "A")) < 100
    assert metric(node, "regctl_dns_truncated_total") == truncated + 3


def test_bad_packets_are_counted_and_change_nothing(dns_cluster: Cluster) -> None:
    node = dns_cluster.nodes[2]
    dns_cluster.client().register("web", "w1", "10.0.0.1", 80)
    wait_until(lambda: values(ask(node, "web.service.consul."), "A") == ["10.0.0.1"], 10.0, "web")
    host, port = hostport(node.dns)
    header = struct.pack("!6H", 0xBEEF, 0x0100, 1, 0, 0, 0)
    bad = [
        b"\x01",  # short: dropped
        header + b"\x03web",  # truncated question: FORMERR
        header + b"\xc0\x0c\x00\x01\x00\x01",  # compression loop: FORMERR
        header + b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01",  # 64-byte label: FORMERR
    ]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2.0)
        for packet in bad:
            sock.sendto(packet, (host, port))
            if len(packet) >= 12:
                reply, _ = sock.recvfrom(4096)
                assert reply[:2] == b"\xbe\xef" and reply[3] & 0x0F == dns.rcode.FORMERR
        # A wrong opcode (UPDATE) is answered NOTIMP.
        sock.sendto(struct.pack("!6H", 0xBEEF, 0x2800, 1, 0, 0, 0) + b"\x00\x00\x01\x00\x01", (host, port))
        reply, _ = sock.recvfrom(4096)
        assert reply[3] & 0x0F == dns.rcode.NOTIMP
    # Over TCP: a length no query has closes the connection, after garbage in a well-framed message.
    with socket.create_connection((host, port), timeout=2.0) as conn:
        conn.sendall(struct.pack("!H", 6) + b"\xff" * 6)  # short: dropped, the connection stays
        conn.sendall(struct.pack("!H", 60000) + b"x" * 100)
        conn.settimeout(2.0)
        assert conn.recv(100) == b""
    assert metric(node, "regctl_dns_malformed_total") >= 6
    # The node is unharmed: it still answers DNS and the API.
    assert values(ask(node, "web.service.consul."), "A") == ["10.0.0.1"]
    assert values(ask(node, "web.service.consul.", tcp=True), "A") == ["10.0.0.1"]
    assert dns_cluster.status(node)["role"] in ("leader", "follower")


@pytest.mark.skipif(shutil.which("dig") is None, reason="dig (Debian bind9-dnsutils) is not installed")
def test_dig(dns_cluster: Cluster) -> None:
    dns_cluster.client().register("web", "w1", "10.0.0.1", 8080)
    node = dns_cluster.nodes[0]
    host, port = hostport(node.dns)

    def dig(*args: str) -> str:
        proc = subprocess.run(["dig", f"@{host}", "-p", str(port), "+time=2", "+tries=1", *args],
                              capture_output=True, text=True, timeout=20, check=False)
        return proc.stdout

    wait_until(lambda: dig("+short", "web.service.consul").split() == ["10.0.0.1"], 10.0, "dig A")
    assert dig("+short", "_web._tcp.service.consul", "SRV").split() == ["1", "1", "8080", "0a000001.addr.consul."]
    assert "status: NXDOMAIN" in dig("nope.service.consul")
    assert "status: REFUSED" in dig("example.com")
    assert dig("+short", "+tcp", "web.service.consul").split() == ["10.0.0.1"]


def test_acl_dns_reads_with_its_token_and_is_off_without_one(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    token_file = tmp_path / "dns.token"
    token_file.write_text("not-issued-yet\n")
    with _cluster(tmp_path, request, "--acl", "--dns-token-file", str(token_file)) as c:
        anon = c.client()
        _, boot = anon.call("acl_bootstrap", {})
        admin = c.client(token=boot["secret"])
        admin.register("web", "w1", "10.0.0.1", 80)
        admin.register("db", "d1", "10.0.0.2", 5432)
        node = c.nodes[0]
        wait_until(lambda: c.client(token=boot["secret"], endpoints=[node.api]).get_service(
            "db", consistency="stale")[1], 10.0, "db on n1")
        # The token in the file does not exist: DNS reads nothing.
        assert ask(node, "web.service.consul.").rcode() == dns.rcode.NXDOMAIN
        admin.call("acl_role_put", {"name": "dns", "rules": ["service:web=read"]})
        _, token = admin.call("acl_token_create", {"roles": ["dns"], "description": "dns"})
        token_file.write_text(token["secret"] + "\n")
        c.stop(node)
        c.start_node(node)
        wait_until(lambda: answered(node, "web.service.consul.") == ["10.0.0.1"], 20.0, "web with token")
        assert ask(node, "db.service.consul.").rcode() == dns.rcode.NXDOMAIN  # no read on db
        # Without a token file, an ACL cluster's node serves no DNS and says so.
        other = c.nodes[1]
        c.stop(other)
        cmd = c.command(other)
        at = cmd.index("--dns-token-file")
        del cmd[at:at + 2]
        with open(other.log_path, "ab") as log:
            other.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: "dns is off: ACLs are on and no --dns-token-file" in other.log_path.read_text(), 20.0,
                   "the dns-off log line")
        with pytest.raises(dns.exception.Timeout):
            ask(other, "web.service.consul.")


# --------------------------------------------------------------------------- HAProxy

class _Named(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = self.server.name.encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def _backend(name: str, host: str) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, 0), _Named)
    server.name = name  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy (Debian haproxy) is not installed")
def test_haproxy_balances_over_srv_and_drops_a_critical_instance(dns_cluster: Cluster, tmp_path: Path) -> None:
    # Three backends on three loopback addresses, so each SRV record has its own target.
    backends = {f"b{i}": _backend(f"b{i}", f"127.0.0.{10 + i}") for i in (1, 2, 3)}
    proc: subprocess.Popen[bytes] | None = None
    try:
        client: SyncClient = dns_cluster.client()
        for name, server in backends.items():
            host, port = server.server_address[:2]
            client.register("web", name, str(host), int(port))
        front = _free_port()
        nameservers = "\n".join(f"  nameserver {n.node_id} {n.dns}" for n in dns_cluster.nodes)
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(f"""
global
  maxconn 100
defaults
  mode http
  timeout connect 1s
  timeout client 5s
  timeout server 5s
resolvers registry
{nameservers}
  accepted_payload_size 1232
  resolve_retries 2
  timeout resolve 200ms
  timeout retry 200ms
  hold valid 1s
  hold obsolete 0s
frontend fe
  bind 127.0.0.1:{front}
  default_backend web
backend web
  balance roundrobin
  server-template web 10 _web._tcp.service.consul resolvers registry init-addr none resolve-prefer ipv4
""")
        check = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True, check=False)
        assert check.returncode == 0, check.stdout + check.stderr
        log = open(tmp_path / "haproxy.log", "wb")
        proc = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
        log.close()

        def answers(n: int) -> list[str]:
            out = []
            for _ in range(n):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{front}/", timeout=2) as resp:
                        out.append(resp.read().decode())
                except OSError as err:
                    out.append(f"error: {err}")
            return out

        wait_until(lambda: set(answers(12)) == {"b1", "b2", "b3"}, 20.0, "HAProxy to balance over b1, b2, b3")
        client.set_status("web", "b2", "critical")
        went_critical = time.monotonic()
        wait_until(lambda: set(answers(12)) == {"b1", "b3"}, 10.0, "HAProxy to drop b2")
        dropped_s = time.monotonic() - went_critical
        print(f"HAProxy dropped the critical instance after {dropped_s:.2f} s")
        # It stays dropped (not a lucky streak of round robin), and the others keep serving.
        assert set(answers(30)) == {"b1", "b3"}, dropped_s
        client.set_status("web", "b2", "passing")
        wait_until(lambda: set(answers(12)) == {"b1", "b2", "b3"}, 10.0, "HAProxy to take b2 back")
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        for server in backends.values():
            server.shutdown()
            server.server_close()
