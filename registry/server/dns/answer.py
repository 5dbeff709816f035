"""DNS answers for services, as Consul gives them: bytes of a query in, bytes of a reply out, no I/O.

Theory of operation
-------------------
``Answerer.answer(data, catalog, tcp=...)`` takes one query message and a
``Catalog`` (the node's local state, behind a narrow read-only interface) and
returns a ``Reply``: the reply bytes, or None when the packet gets no answer
at all, and what happened, for the counters.

Names, under the configured domain (``consul.`` by default):

* ``NAME.service.D`` and ``TAG.NAME.service.D``: A / AAAA records of the
  service's instances (their addresses), and SRV records for an SRV query;
* ``_NAME._TAG.service.D`` (RFC 2782): the same, ``_tcp`` meaning any tag, as
  Consul does (agent/dns.go treats ``_tcp`` as "no tag filter");
* ``HEX.addr.D``: the address spelled in hex (8 digits IPv4, 32 IPv6), the
  target every SRV record names; its A / AAAA record also rides in the SRV
  reply's additional section, so most clients never ask for it;
* the domain itself: its SOA.

Rules: critical instances are left out; a service with no instance left
(or one the catalog hides, for ACLs) is NXDOMAIN, like an unknown name, and
NXDOMAIN / NODATA carry the zone's SOA (its serial is the revision) so
resolvers can cache the negative answer for its minimum TTL; names outside
the domain are REFUSED (we are not a recursive resolver); a packet that is
not a well-formed query gets FORMERR if its header can be answered and
nothing otherwise (a response, or fewer than 12 bytes); other opcodes get
NOTIMP. Answers are shuffled by the ``random.Random`` passed in (tests seed
it). A UDP reply holds at most 512 bytes, or the client's EDNS size capped
by ``udp_payload_bytes_max``; what does not fit is left out and the TC flag
set, so the client asks again over TCP, which gets everything up to 64 KiB.

Speed: dnslib parses every query (about 10 µs), but packing a reply of many
records with it costs ~10 µs a record. So the records of one (service, tag,
type) are packed once per revision and kept (``cache_entries_max`` entries,
cleared when full): each answer record's owner name is a compression pointer
to the question (``0xC00C``, offset 12, where every reply's question starts),
so the cached bytes fit any spelling of the question, and a reply is a
header, the question, and a shuffled join of cached records.
"""

from __future__ import annotations

import ipaddress
import random
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, Protocol

from dnslib import AAAA, EDNS0, QTYPE, RR, SOA, SRV, A, DNSBuffer, DNSHeader, DNSLabel, DNSQuestion, DNSRecord

from .settings import DNS_LABEL_BYTES_MAX, DNS_NAME_BYTES_MAX, TCP_MESSAGE_BYTES_MAX, UDP_PAYLOAD_BYTES_MIN, DnsSettings

__all__ = [
    "Answerer",
    "Catalog",
    "Reply",
    "RESULTS",
    "MALFORMED_REASONS",
    "addr_name",
]

# Reply codes (RFC 1035 4.1.1).
RCODE_NOERROR: Final = 0
RCODE_FORMERR: Final = 1
RCODE_NXDOMAIN: Final = 3
RCODE_NOTIMP: Final = 4
RCODE_REFUSED: Final = 5

#: What became of a query, one counter each (the ``result`` label).
RESULTS: Final = ("answer", "nodata", "nxdomain", "refused", "formerr", "notimp", "dropped")
#: Why a packet was malformed (FORMERR or dropped; the ``reason`` label).
MALFORMED_REASONS: Final = ("short", "oversized", "not_a_query", "unparsable", "question_count", "name_too_long")

_HEADER: Final = struct.Struct("!6H")
_QR: Final = 0x8000
_AA: Final = 0x0400
_TC: Final = 0x0200
_RD: Final = 0x0100
_OPCODE_QUERY: Final = 0
_CLASS_IN: Final = 1
_CLASS_ANY: Final = 255
_OWNER_IS_QUESTION: Final = b"\xc0\x0c"
#: An OPT record with no options: root name, type, class (= UDP size), TTL, empty rdata.
_OPT_BYTES: Final = 11
#: SOA timers (seconds) for secondaries we do not have; Consul's defaults.
_SOA_REFRESH_S: Final = 3600
_SOA_RETRY_S: Final = 600
_SOA_EXPIRE_S: Final = 86400


class Catalog(Protocol):
    """The node's local view of services, as the DNS front end needs it (stale reads)."""

    def revision(self) -> int:
        """The revision the state reflects; answers cached for another revision are rebuilt."""

    def instances(self, service: str) -> Sequence[Mapping[str, Any]] | None:
        """The service's instance records, or None when there is no such service."""

    def may_read(self, service: str) -> bool:
        """Whether DNS may show this service (ACLs); asked on every query, never cached."""


@dataclass(frozen=True, slots=True)
class Reply:
    #: The reply message, or None: send nothing.
    data: bytes | None
    #: One of RESULTS.
    result: str
    truncated: bool = False
    #: One of MALFORMED_REASONS when the packet was malformed, else None.
    malformed: str | None = None


def addr_name(address: ipaddress.IPv4Address | ipaddress.IPv6Address, domain: str) -> str:
    """``10.0.0.1`` -> ``0a000001.addr.consul.``: the SRV target naming an address, as Consul spells it."""
    return f"{address.packed.hex()}.addr.{domain}"


class _Query(NamedTuple):
    ident: int
    flags: int
    labels: tuple[bytes, ...]
    qtype: int
    question: bytes
    #: The client's EDNS UDP payload size, or None without EDNS.
    edns_bytes: int | None


class _Route(NamedTuple):
    """What a question asks for, decided once per distinct question (see ``Answerer._parsed``)."""

    #: service, addr, soa, or a negative result: refused, notimp, nodata, nxdomain.
    action: str
    #: service: the name as asked; addr: the hex spelling.
    name: str = ""
    #: service: the tag asked for, lower case, or "" for any.
    tag: str = ""


_NEGATIVE: Final = {
    "refused": RCODE_REFUSED,
    "notimp": RCODE_NOTIMP,
    "nodata": RCODE_NOERROR,
    "nxdomain": RCODE_NXDOMAIN,
}

# One record of a positive answer and the additional record it brings (b"" for none).
_Chunk = tuple[bytes, bytes]


class Answerer:
    """Builds replies; holds only the packed-record cache (no I/O, no clock)."""

    def __init__(self, settings: DnsSettings, rng: random.Random) -> None:
        self._settings = settings
        self._rng = rng
        self._domain = settings.domain
        self._domain_labels = tuple(settings.domain[:-1].split("."))
        # Root owner, type OPT, class = our UDP size, TTL 0 (rcode ext, version 0, no DO), no rdata.
        self._opt_bytes = b"\x00" + struct.pack("!HHIH", QTYPE.OPT, settings.udp_payload_bytes_max, 0, 0)
        #: (service label, tag or "", kind) -> (revision, chunks, bytes of the smallest chunk)
        self._cache: dict[tuple[str, str, str], tuple[int, list[_Chunk], int]] = {}
        #: A query's bytes after its id -> what parsing and routing them gave (same bytes, same
        #: question): a resolver asks the same few questions over and over, and parsing with
        #: dnslib is half the cost of an answer.  Only well-formed queries get here.
        self._parsed: dict[bytes, tuple[_Query, _Route]] = {}
        #: (is SRV, address, port, weight) -> that instance's packed record(s): see ``_record``.
        self._records: dict[tuple[bool, str, int, int], _Chunk] = {}

    # ------------------------------------------------------------------ entry point

    def answer(self, data: bytes, catalog: Catalog, *, tcp: bool) -> Reply:
        if len(data) < _HEADER.size:
            return Reply(None, "dropped", malformed="short")
        ident, flags, qdcount, ancount, nscount, _arcount = _HEADER.unpack_from(data)
        if flags & _QR:
            # A response, not a query: answering it could start a loop between two servers.
            return Reply(None, "dropped", malformed="not_a_query")
        if len(data) > self._settings.query_bytes_max:
            return self._header_only(ident, flags, RCODE_FORMERR, "formerr", "oversized")
        opcode = (flags >> 11) & 0xF
        if opcode != _OPCODE_QUERY:
            # NOTIFY, UPDATE, IQUERY...: a well-formed request we do not implement (RFC 1035 4.1.1).
            return self._header_only(ident, flags, RCODE_NOTIMP, "notimp", None)
        if qdcount != 1 or ancount or nscount:
            return self._header_only(ident, flags, RCODE_FORMERR, "formerr", "question_count")
        known = self._parsed.get(data[2:])
        if known is not None:
            return self._dispatch(known[0]._replace(ident=ident), known[1], catalog, tcp)
        try:
            record = DNSRecord.parse(data)
        except Exception:
            # dnslib raises DNSError for most damage but also struct, index and unicode errors on
            # some; whatever the bytes, the answer is the same FORMERR.
            return self._header_only(ident, flags, RCODE_FORMERR, "formerr", "unparsable")
        if len(record.questions) != 1:
            return self._header_only(ident, flags, RCODE_FORMERR, "formerr", "question_count")
        question = record.questions[0]
        labels: tuple[bytes, ...] = tuple(question.qname.label)
        # dnslib reads a length byte of 64..191 as a plain length; RFC 1035 allows 63 at most.
        if any(len(label) > DNS_LABEL_BYTES_MAX for label in labels) or (
            sum(len(label) + 1 for label in labels) + 1 > DNS_NAME_BYTES_MAX
        ):
            return self._header_only(ident, flags, RCODE_FORMERR, "formerr", "name_too_long")
        edns_bytes: int | None = None
        for rr in record.ar:
            if rr.rtype == QTYPE.OPT:
                edns_bytes = int(rr.rclass)
        qbuf = DNSBuffer()
        DNSQuestion(DNSLabel(labels), question.qtype, question.qclass).pack(qbuf)
        query = _Query(ident, flags, labels, int(question.qtype), bytes(qbuf.data), edns_bytes)
        route = _Route("refused") if question.qclass not in (_CLASS_IN, _CLASS_ANY) else self._route(query)
        if len(self._parsed) >= self._settings.cache_entries_max:
            self._parsed.clear()
        self._parsed[data[2:]] = (query, route)
        return self._dispatch(query, route, catalog, tcp)

    # ------------------------------------------------------------------ names

    def _route(self, query: _Query) -> _Route:
        try:
            lowered = tuple(label.decode("ascii").lower() for label in query.labels)
        except UnicodeDecodeError:
            lowered = ()
        n = len(self._domain_labels)
        if len(lowered) < n or lowered[len(lowered) - n:] != self._domain_labels:
            return _Route("refused")
        parts = lowered[: len(lowered) - n]
        if query.qtype in (QTYPE.AXFR, QTYPE.IXFR):
            return _Route("notimp")
        if not parts:
            return _Route("soa" if query.qtype in (QTYPE.SOA, QTYPE.ANY) else "nodata")
        if parts[-1] == "addr" and len(parts) == 2:
            return _Route("addr", parts[0])
        if parts[-1] != "service" or len(parts) not in (2, 3):
            return _Route("nxdomain")
        asked = query.labels[: len(parts) - 1]
        if len(parts) == 3 and parts[0].startswith("_") and parts[1].startswith("_"):
            # RFC 2782: _NAME._TAG.service.D, and _tcp filters nothing (Consul's rule).
            return _Route("service", asked[0][1:].decode("ascii"), "" if parts[1] == "_tcp" else parts[1][1:])
        if len(parts) == 3:
            return _Route("service", asked[1].decode("ascii"), parts[0])
        return _Route("service", asked[0].decode("ascii"))

    def _dispatch(self, query: _Query, route: _Route, catalog: Catalog, tcp: bool) -> Reply:
        if route.action == "service":
            return self._service(query, catalog, route.name, route.tag, tcp)
        if route.action == "addr":
            return self._addr(query, catalog, route.name, tcp)
        if route.action == "soa":
            return self._soa_answer(query, catalog)
        return self._negative(query, catalog, _NEGATIVE[route.action], route.action)

    def _addr(self, query: _Query, catalog: Catalog, spelled: str, tcp: bool) -> Reply:
        try:
            packed = bytes.fromhex(spelled)
            address = ipaddress.ip_address(packed)
        except ValueError:
            return self._negative(query, catalog, RCODE_NXDOMAIN, "nxdomain")
        want = QTYPE.A if address.version == 4 else QTYPE.AAAA
        if query.qtype not in (want, QTYPE.ANY):
            return self._negative(query, catalog, RCODE_NOERROR, "nodata")
        rdata = A(str(address)) if address.version == 4 else AAAA(str(address))
        chunk = self._owned_by_question(want, rdata)
        return self._assemble(query, [(chunk, b"")], len(chunk), tcp=tcp)

    def _service(self, query: _Query, catalog: Catalog, service: str, tag: str, tcp: bool) -> Reply:
        qtype = query.qtype
        if qtype == QTYPE.SRV:
            kind = "srv"
        elif qtype == QTYPE.A:
            kind = "a"
        elif qtype == QTYPE.AAAA:
            kind = "aaaa"
        elif qtype == QTYPE.ANY:
            kind = "any"
        else:
            kind = ""
        if not catalog.may_read(service):
            # Hidden by ACLs: the same answer as for a name that does not exist, so DNS tells a
            # client without rights nothing it could not learn by guessing.
            return self._negative(query, catalog, RCODE_NXDOMAIN, "nxdomain")
        revision = catalog.revision()
        key = (service, tag, kind)
        cached = self._cache.get(key)
        if cached is None or cached[0] != revision:
            records = catalog.instances(service)
            if records is None and service != service.lower():
                records = catalog.instances(service.lower())
            live = [] if records is None else [r for r in records if _selected(r, tag)]
            if not live:
                return self._negative(query, catalog, RCODE_NXDOMAIN, "nxdomain")
            if not kind:
                # The name exists but has no records of this type (TXT, MX, ...): NODATA.
                return self._negative(query, catalog, RCODE_NOERROR, "nodata")
            if len(self._cache) >= self._settings.cache_entries_max:
                self._cache.clear()
            chunks = self._chunks(live, kind)
            # Answer records alone: an additional record already sent for another costs nothing more.
            smallest = min((len(answer) for answer, _ in chunks), default=0)
            cached = self._cache[key] = (revision, chunks, smallest)
        _, chunks, smallest = cached
        if not chunks:
            return self._negative(query, catalog, RCODE_NOERROR, "nodata")
        return self._assemble(query, chunks, smallest, tcp=tcp)

    # ------------------------------------------------------------------ records

    def _chunks(self, instances: list[Mapping[str, Any]], kind: str) -> list[_Chunk]:
        out: list[_Chunk] = []
        seen: set[bytes] = set()
        for inst in instances:
            srv = kind == "srv"
            key = (srv, str(inst["address"]), int(inst["port"]) if srv else 0, int(inst["weight"]) if srv else 0)
            chunk = self._records.get(key)
            if chunk is None:
                if len(self._records) >= self._settings.record_cache_entries_max:
                    self._records.clear()
                chunk = self._records[key] = self._record(*key)
            if not chunk[0]:
                continue  # no record of this kind for this address
            if not srv:
                rtype = _rtype(chunk[0])
                if (kind == "a" and rtype != QTYPE.A) or (kind == "aaaa" and rtype != QTYPE.AAAA):
                    continue
                if chunk[0] in seen:
                    continue  # two instances on one address (other ports): one record, as a set must be
                seen.add(chunk[0])
            out.append(chunk)
        return out

    def _record(self, srv: bool, address_text: str, port: int, weight: int) -> _Chunk:
        """One instance's packed record(s); (b"", b"") when it has none of this kind.

        Kept per (kind, address, port, weight) across revisions: a write elsewhere in the state
        invalidates the per-service answers, and re-packing 100 records with dnslib would cost
        a millisecond, where looking them up here costs a few microseconds.
        """
        ttl = self._settings.ttl_s
        address = _ip(address_text)
        if srv:
            if address is not None:
                target = addr_name(address, self._domain)
                rtype = QTYPE.A if address.version == 4 else QTYPE.AAAA
                rdata = A(str(address)) if address.version == 4 else AAAA(str(address))
                extra = _pack(RR(DNSLabel(target), rtype, ttl=ttl, rdata=rdata))
            else:
                host = _host_name(address_text)
                if host is None:
                    return b"", b""  # not a name DNS can carry
                target, extra = host, b""
            return self._owned_by_question(QTYPE.SRV, SRV(priority=1, weight=weight, port=port, target=target)), extra
        if address is None:
            return b"", b""  # a host name: no address record of ours (see docs/dns.md)
        if address.version == 4:
            return self._owned_by_question(QTYPE.A, A(str(address))), b""
        return self._owned_by_question(QTYPE.AAAA, AAAA(str(address))), b""

    def _owned_by_question(self, rtype: int, rdata: Any) -> bytes:
        # Packed with the root as owner (one zero byte), which is then swapped for a pointer to the
        # question's name: see "Speed" in the module docstring.
        packed = _pack(RR(DNSLabel("."), rtype, ttl=self._settings.ttl_s, rdata=rdata))
        return _OWNER_IS_QUESTION + packed[1:]

    # ------------------------------------------------------------------ messages

    def _limit(self, query: _Query, tcp: bool) -> int:
        if tcp:
            return TCP_MESSAGE_BYTES_MAX
        if query.edns_bytes is None:
            return UDP_PAYLOAD_BYTES_MIN
        return max(UDP_PAYLOAD_BYTES_MIN, min(query.edns_bytes, self._settings.udp_payload_bytes_max))

    def _assemble(self, query: _Query, chunks: list[_Chunk], smallest: int, *, tcp: bool) -> Reply:
        limit = self._limit(query, tcp)
        size = _HEADER.size + len(query.question) + (_OPT_BYTES if query.edns_bytes is not None else 0)
        # A random subset in random order, no bigger than could fit (one more, to know it is cut):
        # drawing 20 of 100 costs a fifth of shuffling all 100, and reads the same to a client.
        fit = (limit - size) // max(1, smallest) + 1
        order = self._rng.sample(chunks, min(len(chunks), fit))
        answers: list[bytes] = []
        extras: list[bytes] = []
        seen: set[bytes] = set()
        truncated = False
        for answer, extra in order:
            need = len(answer)
            new_extra = bool(extra) and extra not in seen
            if new_extra:
                need += len(extra)
            if size + need > limit:
                truncated = True
                break
            size += need
            answers.append(answer)
            if new_extra:
                seen.add(extra)
                extras.append(extra)
        opt = self._opt(query)
        flags = _QR | _AA | (query.flags & _RD) | (_TC if truncated else 0)
        header = _HEADER.pack(query.ident, flags, 1, len(answers), 0, len(extras) + (1 if opt else 0))
        data = b"".join((header, query.question, *answers, *extras, opt))
        return Reply(data, "answer", truncated=truncated)

    def _opt(self, query: _Query) -> bytes:
        return b"" if query.edns_bytes is None else self._opt_bytes

    def _soa(self, catalog: Catalog) -> RR:
        domain = self._domain
        ttl = self._settings.ttl_s
        times = (catalog.revision() % (1 << 32), _SOA_REFRESH_S, _SOA_RETRY_S, _SOA_EXPIRE_S, ttl)
        return RR(DNSLabel(domain), QTYPE.SOA, ttl=ttl,
                  rdata=SOA(DNSLabel("ns." + domain), DNSLabel("hostmaster." + domain), times))

    def _message(self, query: _Query, rcode: int) -> DNSRecord:
        header = DNSHeader(id=query.ident, qr=1, aa=1, rd=(query.flags & _RD) >> 8, rcode=rcode)
        msg = DNSRecord(header)
        # The question as parsed (not re-read from the header), so an odd one cannot break the reply.
        msg.add_question(DNSQuestion(DNSLabel(query.labels), query.qtype))
        return msg

    def _finish(self, query: _Query, msg: DNSRecord) -> bytes:
        if query.edns_bytes is not None:
            msg.add_ar(EDNS0(udp_len=self._settings.udp_payload_bytes_max))
        return bytes(msg.pack())

    def _negative(self, query: _Query, catalog: Catalog, rcode: int, result: str) -> Reply:
        msg = self._message(query, rcode)
        if rcode in (RCODE_NXDOMAIN, RCODE_NOERROR):
            msg.add_auth(self._soa(catalog))  # RFC 2308: negative answers carry the SOA
        return Reply(self._finish(query, msg), result)

    def _soa_answer(self, query: _Query, catalog: Catalog) -> Reply:
        msg = self._message(query, RCODE_NOERROR)
        msg.add_answer(self._soa(catalog))
        return Reply(self._finish(query, msg), "answer")

    def _header_only(self, ident: int, flags: int, rcode: int, result: str, malformed: str | None) -> Reply:
        # Opcode and RD echoed; no question, since the one sent could not be read or is not ours to read.
        reply_flags = _QR | (flags & 0x7800) | (flags & _RD) | rcode
        return Reply(_HEADER.pack(ident, reply_flags, 0, 0, 0, 0), result, malformed=malformed)


def _rtype(answer: bytes) -> int:
    """The type of a record packed by ``_owned_by_question``: the two bytes after the owner pointer."""
    return int.from_bytes(answer[2:4], "big")


def _pack(rr: RR) -> bytes:
    buf = DNSBuffer()
    rr.pack(buf)
    return bytes(buf.data)


def _selected(record: Mapping[str, Any], tag: str) -> bool:
    if record.get("status") == "critical":
        return False
    if not tag:
        return True
    # DNS names are case-insensitive, so tags are matched that way too.
    return any(str(t).lower() == tag for t in record.get("tags", ()))


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _host_name(text: str) -> str | None:
    """A registered host name as an SRV target, or None when it is not a valid DNS name."""
    name = text.rstrip(".")
    labels = name.split(".")
    if not name or len(name) + 2 > DNS_NAME_BYTES_MAX:
        return None
    for label in labels:
        if not 0 < len(label) <= DNS_LABEL_BYTES_MAX or not all(c.isalnum() or c in "-_" for c in label):
            return None
        if not label.isascii():
            return None
    return name + "."
