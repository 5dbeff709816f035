"""DNS front end settings: one frozen value built at the edge (CLI) and checked by ``validate()``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from registry.errors import InvalidArgument

__all__ = [
    "DOMAIN_DEFAULT",
    "DNS_NAME_BYTES_MAX",
    "DNS_LABEL_BYTES_MAX",
    "UDP_PAYLOAD_BYTES_MIN",
    "TCP_MESSAGE_BYTES_MAX",
    "DnsSettings",
    "normalize_domain",
]

#: Consul's domain, so programs and proxies written for Consul find us unchanged.
DOMAIN_DEFAULT: Final = "consul."
#: RFC 1035 2.3.4: a name is at most 255 bytes on the wire, a label at most 63.
DNS_NAME_BYTES_MAX: Final = 255
DNS_LABEL_BYTES_MAX: Final = 63
#: RFC 1035 4.2.1: every resolver takes a 512-byte UDP answer; more only when EDNS says so.
UDP_PAYLOAD_BYTES_MIN: Final = 512
#: A DNS message over TCP has a 16-bit length prefix.
TCP_MESSAGE_BYTES_MAX: Final = 65535

_LABEL_RE: Final = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")


def normalize_domain(text: str) -> str:
    """``Consul`` -> ``consul.``: lower case, one trailing dot; raise InvalidArgument for a bad name."""
    domain = text.strip().lower()
    if not domain.endswith("."):
        domain += "."
    labels = domain[:-1].split(".")
    if len(domain) > DNS_NAME_BYTES_MAX - 64 or not all(
        len(label) <= DNS_LABEL_BYTES_MAX and _LABEL_RE.fullmatch(label) for label in labels
    ):
        # 64 bytes short of the DNS maximum, so that service, tag and "service" labels still fit.
        raise InvalidArgument(f"--dns-domain must be a DNS name of letters, digits and '-', got {text!r}")
    return domain


@dataclass(frozen=True, slots=True)
class DnsSettings:
    """Where and how a node answers DNS; ``None`` in NodeConfig means DNS is off."""

    host: str
    port: int
    domain: str = DOMAIN_DEFAULT
    #: TTL of every answer; 0 (Consul's default) so that resolvers and proxies ask again and see a
    #: critical instance leave at once.  Raise it only to trade freshness for fewer queries.
    ttl_s: int = 0
    #: With --acl: the secret of the token whose read rights DNS answers with (None: DNS stays off).
    token: str | None = None
    #: Largest UDP answer we send even when a client's EDNS offers more: 4096 is what most resolvers
    #: offer, and bigger datagrams fragment on ordinary networks (DNS flag day 2020 suggests 1232).
    udp_payload_bytes_max: int = 1232
    #: Largest query accepted: a question is at most 255 + 4 bytes plus a 12-byte header and an
    #: EDNS record; anything far bigger is not a query we answer.
    query_bytes_max: int = 1024
    #: Open TCP connections at once; more are closed at accept.
    tcp_connections_max: int = 256
    #: A TCP connection that sends no complete query for this long is closed.
    tcp_idle_s: float = 10.0
    #: Answers kept ready per (name, type), rebuilt when the state's revision moves.
    cache_entries_max: int = 4096
    #: Packed records kept per instance (address, port, weight), so that answers rebuilt after a
    #: write elsewhere do not pack them again: ~100 bytes each, 6.5 MB at most.
    record_cache_entries_max: int = 65_536

    def validate(self) -> None:
        if not 1 <= self.port <= 65535:
            raise InvalidArgument(f"--dns port must be 1..65535, got {self.port}")
        if normalize_domain(self.domain) != self.domain:
            raise InvalidArgument(f"dns domain must be normalized (lower case, trailing dot), got {self.domain!r}")
        if not 0 <= self.ttl_s <= 86_400:
            raise InvalidArgument("--dns-ttl must be 0..86400 seconds")
        if not UDP_PAYLOAD_BYTES_MIN <= self.udp_payload_bytes_max <= TCP_MESSAGE_BYTES_MAX:
            raise InvalidArgument(f"udp_payload_bytes_max must be {UDP_PAYLOAD_BYTES_MIN}..{TCP_MESSAGE_BYTES_MAX}")
        if not 300 <= self.query_bytes_max <= TCP_MESSAGE_BYTES_MAX:
            raise InvalidArgument("query_bytes_max must be 300..65535 (a question alone can be 271 bytes)")
        if not 1 <= self.tcp_connections_max <= 100_000:
            raise InvalidArgument("tcp_connections_max must be 1..100000")
        if self.tcp_idle_s <= 0:
            raise InvalidArgument("tcp_idle_s must be positive")
        if not 1 <= self.cache_entries_max <= 1_000_000:
            raise InvalidArgument("cache_entries_max must be 1..1000000")
        if not 1 <= self.record_cache_entries_max <= 10_000_000:
            raise InvalidArgument("record_cache_entries_max must be 1..10000000")
        if self.token is not None and not self.token:
            raise InvalidArgument("the DNS token file is empty")
