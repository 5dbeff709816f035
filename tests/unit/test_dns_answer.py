"""The DNS answer builder (registry/server/dns/answer.py), over a real RegistryState.

Queries are built and replies read with dnspython, a DNS implementation
independent of dnslib (which the answerer uses), so a packing mistake on our
side shows up as a reply dnspython cannot read or reads differently.
"""

from __future__ import annotations

import random
import struct
from typing import Any

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import pytest

from registry.errors import InvalidArgument
from registry.fsm.acl import hash_secret
from registry.fsm.state import RegistryState
from registry.raft.node import StateHolder
from registry.server.dns.answer import Answerer, Reply, addr_name
from registry.server.dns.server import StateCatalog
from registry.server.dns.settings import DnsSettings, normalize_domain

Cmd = dict[str, Any]


def reg(svc: str, iid: str, address: str, port: int = 80, **kw: Any) -> Cmd:
    return {"op": "register", "service": svc, "id": iid, "address": address, "port": port, **kw}


def catalog_of(*commands: Cmd, principal: str | None = None) -> StateCatalog:
    state = RegistryState()
    for cmd in commands:
        state.apply(cmd)
    return StateCatalog(StateHolder(state), principal)


WORLD = (
    reg("web", "w1", "10.0.0.1", 8001, tags=["v1", "Blue"]),
    reg("web", "w2", "10.0.0.2", 8002, tags=["v2"], weight=5),
    reg("web", "w3", "10.0.0.3", 8003, tags=["v1"], status="critical"),
    reg("web", "w4", "10.0.0.2", 8004, tags=["v2"]),  # same host as w2, other port
    reg("web", "w5", "10.0.0.5", 8005, status="warning"),
    reg("v6", "x1", "2001:db8::1", 9001),
    reg("named", "n1", "db1.example.internal", 5432),
    reg("down", "d1", "10.0.9.1", 1, status="critical"),
)


def answerer(seed: int = 1, **settings: Any) -> Answerer:
    return Answerer(DnsSettings(host="127.0.0.1", port=8600, **settings), random.Random(seed))


def ask(name: str, rdtype: str = "A", *, tcp: bool = False, catalog: StateCatalog | None = None,
        edns: int | None = None, seed: int = 1, **settings: Any) -> tuple[Reply, dns.message.Message]:
    query = dns.message.make_query(name, rdtype, use_edns=edns is not None, payload=edns or 512)
    reply = answerer(seed, **settings).answer(query.to_wire(), catalog or catalog_of(*WORLD), tcp=tcp)
    assert reply.data is not None
    msg = dns.message.from_wire(reply.data)
    assert msg.id == query.id
    return reply, msg


def records(msg: dns.message.Message, section: str = "answer") -> list[str]:
    out = []
    for rrset in getattr(msg, section):
        for rd in rrset:
            out.append(f"{rrset.name} {dns.rdatatype.to_text(rrset.rdtype)} {rd.to_text()}")
    return sorted(out)


# --------------------------------------------------------------------------- names and types

@pytest.mark.parametrize(
    ("name", "rdtype", "rcode", "answer"),
    [
        # Critical w3 is left out; w2 and w4 share one address, so one A record.
        ("web.service.consul.", "A", "NOERROR", ["10.0.0.1", "10.0.0.2", "10.0.0.5"]),
        ("WEB.Service.CONSUL.", "A", "NOERROR", ["10.0.0.1", "10.0.0.2", "10.0.0.5"]),
        ("v1.web.service.consul.", "A", "NOERROR", ["10.0.0.1"]),  # w3 has v1 too, but is critical
        ("blue.web.service.consul.", "A", "NOERROR", ["10.0.0.1"]),  # tags match case-insensitively
        ("v2.web.service.consul.", "A", "NOERROR", ["10.0.0.2"]),
        ("nope.web.service.consul.", "A", "NXDOMAIN", []),
        ("web.service.consul.", "AAAA", "NOERROR", []),  # exists, no IPv6 instance: NODATA
        ("web.service.consul.", "TXT", "NOERROR", []),
        ("v6.service.consul.", "AAAA", "NOERROR", ["2001:db8::1"]),
        ("v6.service.consul.", "A", "NOERROR", []),
        ("named.service.consul.", "A", "NOERROR", []),  # a host name has no address record of ours
        ("down.service.consul.", "A", "NXDOMAIN", []),  # every instance critical
        ("ghost.service.consul.", "A", "NXDOMAIN", []),
        ("web.node.consul.", "A", "NXDOMAIN", []),
        ("a.b.web.service.consul.", "A", "NXDOMAIN", []),
        ("0a000001.addr.consul.", "A", "NOERROR", ["10.0.0.1"]),
        ("20010db8000000000000000000000001.addr.consul.", "AAAA", "NOERROR", ["2001:db8::1"]),
        ("0a000001.addr.consul.", "AAAA", "NOERROR", []),
        ("zz.addr.consul.", "A", "NXDOMAIN", []),
        ("web.service.example.com.", "A", "REFUSED", []),
        ("com.", "A", "REFUSED", []),
        (".", "NS", "REFUSED", []),
        ("consul.", "A", "NOERROR", []),
    ],
)
def test_names(name: str, rdtype: str, rcode: str, answer: list[str]) -> None:
    reply, msg = ask(name, rdtype)
    assert dns.rcode.to_text(msg.rcode()) == rcode
    got = sorted(rd.to_text() for rrset in msg.answer for rd in rrset)
    assert got == sorted(answer)
    assert msg.flags & dns.flags.QR and not msg.flags & dns.flags.TC
    for rrset in msg.answer:
        assert rrset.ttl == 0
        assert rrset.name == dns.name.from_text(name)  # the owner is the question, as asked
    if rcode in ("NXDOMAIN",) or (rcode == "NOERROR" and not answer):
        # RFC 2308: negative answers carry the zone's SOA, its serial the revision.
        assert [r.split()[1] for r in records(msg, "authority")] == ["SOA"]
        assert msg.authority[0][0].serial == len(WORLD)
    if rcode == "REFUSED":
        assert not msg.authority
    assert reply.result == {"NXDOMAIN": "nxdomain", "REFUSED": "refused"}.get(
        rcode, "answer" if answer else "nodata")


def test_srv_names_targets_and_additional_addresses() -> None:
    for name in ("web.service.consul.", "_web._tcp.service.consul.", "_WEB._TCP.service.consul."):
        _, msg = ask(name, "SRV")
        assert records(msg) == [
            f"{name} SRV 1 1 8001 0a000001.addr.consul.",
            f"{name} SRV 1 1 8004 0a000002.addr.consul.",
            f"{name} SRV 1 1 8005 0a000005.addr.consul.",
            f"{name} SRV 1 5 8002 0a000002.addr.consul.",
        ]
        # One address record per target, even for two instances on one host.
        assert records(msg, "additional") == [
            "0a000001.addr.consul. A 10.0.0.1",
            "0a000002.addr.consul. A 10.0.0.2",
            "0a000005.addr.consul. A 10.0.0.5",
        ]


@pytest.mark.parametrize(
    ("name", "ports"),
    [
        ("_web._v1.service.consul.", [8001]),
        ("_web._v2.service.consul.", [8002, 8004]),
        ("v2.web.service.consul.", [8002, 8004]),
        ("_named._tcp.service.consul.", [5432]),
        ("_v6._tcp.service.consul.", [9001]),
    ],
)
def test_srv_tags(name: str, ports: list[int]) -> None:
    _, msg = ask(name, "SRV")
    assert sorted(rd.port for rrset in msg.answer for rd in rrset) == ports


def test_srv_for_host_name_and_ipv6_targets() -> None:
    _, msg = ask("named.service.consul.", "SRV")
    assert records(msg) == ["named.service.consul. SRV 1 1 5432 db1.example.internal."]
    assert records(msg, "additional") == []
    _, msg = ask("v6.service.consul.", "SRV")
    assert records(msg, "additional") == ["20010db8000000000000000000000001.addr.consul. AAAA 2001:db8::1"]


def test_domain_is_configurable_and_soa_answers_at_the_apex() -> None:
    _, msg = ask("web.service.reg.example.", "A", domain="reg.example.")
    assert len(msg.answer[0]) == 3
    _, msg = ask("web.service.consul.", "A", domain="reg.example.")
    assert msg.rcode() == dns.rcode.REFUSED
    _, msg = ask("reg.example.", "SOA", domain="reg.example.")
    assert records(msg) == [f"reg.example. SOA ns.reg.example. hostmaster.reg.example. {len(WORLD)} 3600 600 86400 0"]


def test_ttl_setting() -> None:
    _, msg = ask("web.service.consul.", "SRV", ttl_s=30)
    assert {rrset.ttl for rrset in (*msg.answer, *msg.additional)} == {30}


def test_answers_are_shuffled_by_the_rng_given() -> None:
    cat = catalog_of(*(reg("big", f"b{i}", f"10.1.0.{i}") for i in range(1, 21)))
    orders = set()
    for seed in range(8):
        _, msg = ask("big.service.consul.", "A", catalog=cat, seed=seed)
        orders.add(tuple(rd.to_text() for rd in msg.answer[0]))
    assert len(orders) > 1
    # The same seed gives the same order: tests (and replays) are deterministic.
    assert ask("big.service.consul.", "A", catalog=cat, seed=3)[1].answer == \
        ask("big.service.consul.", "A", catalog=cat, seed=3)[1].answer


def test_cached_records_follow_the_revision() -> None:
    state = RegistryState()
    state.apply(reg("web", "w1", "10.0.0.1"))
    cat = StateCatalog(StateHolder(state), None)
    ans = answerer()

    def addresses() -> list[str]:
        query = dns.message.make_query("web.service.consul.", "A")
        data = ans.answer(query.to_wire(), cat, tcp=False).data
        assert data is not None
        return sorted(rd.to_text() for rrset in dns.message.from_wire(data).answer for rd in rrset)

    assert addresses() == ["10.0.0.1"]
    state.apply(reg("web", "w2", "10.0.0.2"))
    assert addresses() == ["10.0.0.1", "10.0.0.2"]
    state.apply({"op": "set_status", "service": "web", "id": "w1", "status": "critical"})
    assert addresses() == ["10.0.0.2"]
    # A changed weight or port is a new SRV record, not the one packed before.
    state.apply(reg("web", "w2", "10.0.0.2", 81, weight=7))
    query = dns.message.make_query("web.service.consul.", "SRV")
    data = ans.answer(query.to_wire(), cat, tcp=False).data
    assert data is not None
    assert [rd.to_text() for rd in dns.message.from_wire(data).answer[0]] == ["1 7 81 0a000002.addr.consul."]


# --------------------------------------------------------------------------- sizes

def big_catalog(n: int = 100) -> StateCatalog:
    return catalog_of(*(reg("big", f"b{i:03d}", f"10.2.{i // 250}.{i % 250 + 1}", 7000 + i) for i in range(n)))


@pytest.mark.parametrize(
    ("rdtype", "tcp", "edns", "limit", "count"),
    [
        ("A", False, None, 512, None),
        ("SRV", False, None, 512, None),
        ("A", False, 1232, 1232, None),
        ("SRV", False, 4096, 1232, None),  # capped by udp_payload_bytes_max
        ("A", False, 100, 512, None),  # an EDNS size under 512 still gets 512 (RFC 6891 6.2.3)
        ("A", True, None, 65535, 100),
        ("SRV", True, None, 65535, 100),
    ],
)
def test_udp_truncates_and_tcp_returns_all(rdtype: str, tcp: bool, edns: int | None, limit: int,
                                           count: int | None) -> None:
    reply, msg = ask("big.service.consul.", rdtype, tcp=tcp, edns=edns, catalog=big_catalog())
    assert reply.data is not None and len(reply.data) <= limit
    got = sum(len(rrset) for rrset in msg.answer)
    if count is None:
        assert msg.flags & dns.flags.TC and reply.truncated
        assert 0 < got < 100
        # Full: one more record (and its address) would not have fitted.
        assert len(reply.data) + (16 if rdtype == "A" else 76) > limit
    else:
        assert not msg.flags & dns.flags.TC and not reply.truncated
        assert got == count
    if rdtype == "SRV":
        # Every SRV record that made it has its address in the additional section.
        targets = {rd.target for rrset in msg.answer for rd in rrset}
        assert targets == {rrset.name for rrset in msg.additional if rrset.rdtype == dns.rdatatype.A}
    if edns is not None:
        assert msg.edns == 0 and msg.payload == 1232


def test_srv_on_one_shared_address_truncates_too() -> None:
    # Every SRV record names one target, so its address record is sent once: more records fit,
    # and the reply must still say when some were left out.
    cat = catalog_of(*(reg("one", f"o{i:03d}", "10.3.0.1", 7000 + i) for i in range(100)))
    reply, msg = ask("one.service.consul.", "SRV", catalog=cat)
    assert reply.data is not None and msg.flags & dns.flags.TC
    assert len(reply.data) + 40 > 512 and 0 < len(msg.answer[0]) < 100
    assert records(msg, "additional") == ["0a030001.addr.consul. A 10.3.0.1"]
    _, whole = ask("one.service.consul.", "SRV", catalog=cat, tcp=True)
    assert len(whole.answer[0]) == 100 and not whole.flags & dns.flags.TC


def test_a_query_asked_again_is_answered_from_the_parse_cache_with_its_own_id() -> None:
    ans = answerer()
    cat = catalog_of(*WORLD)
    query = dns.message.make_query("_web._v2.service.consul.", "SRV")
    for ident in (1, 2, 65535):
        query.id = ident
        data = ans.answer(query.to_wire(), cat, tcp=False).data
        assert data is not None
        msg = dns.message.from_wire(data)
        assert msg.id == ident and sorted(rd.port for rd in msg.answer[0]) == [8002, 8004]
    # A different question in otherwise equal bytes (RD flag cleared) is parsed afresh.
    query.flags &= ~dns.flags.RD
    data = ans.answer(query.to_wire(), cat, tcp=False).data
    assert data is not None and not dns.message.from_wire(data).flags & dns.flags.RD


# --------------------------------------------------------------------------- bad input

def header(ident: int = 0x1234, flags: int = 0x0100, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0) -> bytes:
    return struct.pack("!6H", ident, flags, qd, an, ns, ar)


QUESTION = b"\x03web\x07service\x06consul\x00\x00\x01\x00\x01"


@pytest.mark.parametrize(
    ("packet", "result", "malformed", "rcode"),
    [
        (b"", "dropped", "short", None),
        (b"\x12\x34\x01", "dropped", "short", None),
        (header()[:11], "dropped", "short", None),
        (header(flags=0x8100) + QUESTION, "dropped", "not_a_query", None),  # a response
        (header() + QUESTION[:9], "formerr", "unparsable", 1),  # truncated in the name
        (header() + QUESTION[:-2], "formerr", "unparsable", 1),  # truncated in the class
        (header(qd=0), "formerr", "question_count", 1),
        (header(qd=2) + QUESTION + QUESTION, "formerr", "question_count", 1),
        (header(an=1) + QUESTION, "formerr", "question_count", 1),
        (header() + b"\xc0\x0c\x00\x01\x00\x01", "formerr", "unparsable", 1),  # pointer to itself
        (header() + b"\x01a\xc0\x0c\x00\x01\x00\x01", "formerr", "unparsable", 1),  # loop through a label
        (header() + b"\xc0\xff\x00\x01\x00\x01", "formerr", "unparsable", 1),  # pointer past the end
        (header() + b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01", "formerr", "name_too_long", 1),
        (header() + b"\x3f" + b"a" * 63 + b"\x3f" + b"b" * 63 + b"\x3f" + b"c" * 63 + b"\x3f" + b"d" * 63
         + b"\x00\x00\x01\x00\x01", "formerr", "name_too_long", 1),  # 257 bytes
        (header(flags=0x2100) + QUESTION, "notimp", None, 4),  # opcode UPDATE
        (header(flags=0x1100) + QUESTION, "notimp", None, 4),  # opcode STATUS
        (header() + QUESTION + b"\x00" * 2000, "formerr", "oversized", 1),
        (header() + b"\xff" * 40, "formerr", "unparsable", 1),
        (header(ar=1) + QUESTION + b"\x00\x00\x29", "formerr", "unparsable", 1),  # truncated OPT
    ],
)
def test_malformed_packets(packet: bytes, result: str, malformed: str | None, rcode: int | None) -> None:
    reply = answerer().answer(packet, catalog_of(*WORLD), tcp=False)
    assert (reply.result, reply.malformed) == (result, malformed)
    if rcode is None:
        assert reply.data is None
    else:
        assert reply.data is not None
        msg = dns.message.from_wire(reply.data, question_only=True)
        assert msg.id == 0x1234 and msg.rcode() == rcode and msg.flags & dns.flags.QR


def test_other_classes_and_zone_transfers() -> None:
    query = dns.message.make_query("web.service.consul.", "A", rdclass="CH")
    reply = answerer().answer(query.to_wire(), catalog_of(*WORLD), tcp=False)
    assert reply.data is not None and dns.message.from_wire(reply.data).rcode() == dns.rcode.REFUSED
    _, msg = ask("consul.", "AXFR", tcp=True)
    assert msg.rcode() == dns.rcode.NOTIMP


def test_random_bytes_never_raise() -> None:
    rng = random.Random(7)
    ans = answerer()
    cat = catalog_of(*WORLD)
    base = dns.message.make_query("_web._tcp.service.consul.", "SRV", use_edns=True).to_wire()
    for _ in range(3000):
        data = bytearray(base)
        for _ in range(rng.randrange(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        data = data[: rng.randrange(len(data) + 1)] if rng.random() < 0.3 else data
        reply = ans.answer(bytes(data), cat, tcp=bool(rng.getrandbits(1)))
        assert reply.result in ("answer", "nodata", "nxdomain", "refused", "formerr", "notimp", "dropped")
        if reply.data is not None:
            dns.message.from_wire(reply.data, question_only=True)


# --------------------------------------------------------------------------- ACLs

def test_acl_hides_services_the_token_may_not_read() -> None:
    admin, reader = hash_secret("admin-secret"), hash_secret("reader-secret")
    cmds = (
        *WORLD,
        {"op": "acl_bootstrap", "token_id": "admin", "secret_hash": admin},
        {"op": "acl_role_put", "name": "web-ro", "rules": ["service:web=read"], "auth": admin, "now_ms": 1},
        {"op": "acl_token_create", "token_id": "dns", "secret_hash": reader, "roles": ["web-ro"], "auth": admin,
         "now_ms": 1},
    )
    _, msg = ask("web.service.consul.", "A", catalog=catalog_of(*cmds, principal=reader))
    assert len(msg.answer[0]) == 3
    _, msg = ask("v6.service.consul.", "AAAA", catalog=catalog_of(*cmds, principal=reader))
    assert msg.rcode() == dns.rcode.NXDOMAIN and not msg.answer
    # A token that does not exist reads nothing.
    _, msg = ask("web.service.consul.", "A", catalog=catalog_of(*cmds, principal=hash_secret("nope")))
    assert msg.rcode() == dns.rcode.NXDOMAIN


# --------------------------------------------------------------------------- settings

@pytest.mark.parametrize(
    ("text", "expected"),
    [("consul", "consul."), ("Consul.", "consul."), ("reg.example.com", "reg.example.com."),
     ("", None), ("a..b", None), ("-x.", None), ("a_b.", None), ("x" * 64 + ".", None)],
)
def test_normalize_domain(text: str, expected: str | None) -> None:
    if expected is None:
        with pytest.raises(InvalidArgument):
            normalize_domain(text)
    else:
        assert normalize_domain(text) == expected


@pytest.mark.parametrize(
    "changes",
    [{"port": 0}, {"domain": "Consul"}, {"ttl_s": -1}, {"udp_payload_bytes_max": 511},
     {"query_bytes_max": 100}, {"tcp_connections_max": 0}, {"tcp_idle_s": 0}, {"cache_entries_max": 0},
     {"record_cache_entries_max": 0},
     {"token": ""}],
)
def test_settings_validate(changes: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument):
        DnsSettings(host="127.0.0.1", **{"port": 8600, **changes}).validate()


def test_addr_name() -> None:
    import ipaddress

    assert addr_name(ipaddress.ip_address("10.0.0.1"), "consul.") == "0a000001.addr.consul."


def test_node_config_refuses_dns_on_the_api_or_http_address(tmp_path: Any) -> None:
    from registry.config import NodeConfig

    base = NodeConfig(node_id="n1", data_dir=tmp_path, raft_addr="127.0.0.1:7101", peers=(), dev=True)
    base.replace(dns=DnsSettings(host="127.0.0.1", port=7401)).validate()
    for port in (base.api_port, base.http_port):
        with pytest.raises(InvalidArgument, match="--dns"):
            base.replace(dns=DnsSettings(host="127.0.0.1", port=port)).validate()
    with pytest.raises(InvalidArgument):
        base.replace(dns=DnsSettings(host="127.0.0.1", port=7401, domain="Bad_Domain.")).validate()


def test_cli_dns_flags(tmp_path: Any) -> None:
    from click.testing import CliRunner

    from cli.main import cli

    common = ["server", "--id", "n1", "--data-dir", str(tmp_path), "--raft", "127.0.0.1:7101", "--dev"]
    for extra, message in [
        (["--dns-token-file", str(tmp_path / "t")], "--dns-token-file needs --dns"),
        (["--dns", "127.0.0.1"], "--dns must be HOST:PORT"),
        (["--dns", "127.0.0.1:7001"], "must differ from --api, --http and --consul-http"),
        (["--dns", "127.0.0.1:7301", "--consul-http", "127.0.0.1:7301"], "must differ from --api, --http and"),
        (["--dns", "127.0.0.1:7401", "--dns-domain", "a..b"], "--dns-domain must be a DNS name"),
        (["--dns", "127.0.0.1:7401", "--dns-token-file", str(tmp_path / "missing")], "cannot read --dns-token-file"),
    ]:
        result = CliRunner().invoke(cli, [*common, *extra])
        assert result.exit_code == 2 and message in result.output, (extra, result.output)
