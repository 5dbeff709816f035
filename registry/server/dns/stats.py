"""DNS counters in plain ints, rendered by prometheus-client only at scrape time.

Every query is counted on the event loop thread, where a dict add costs far
less than prometheus-client's locked ``Counter.inc`` (see ``RequestStats``
in registry/server/metrics.py for the measurement that chose this shape).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .answer import MALFORMED_REASONS, RESULTS, Reply

__all__ = ["DnsStats", "TRANSPORTS"]

TRANSPORTS = ("udp", "tcp")


class DnsStats(Collector):
    """``regctl_dns_queries{transport,result}``, ``regctl_dns_malformed{reason}``, ``regctl_dns_truncated``."""

    def __init__(self) -> None:
        self.queries = {(t, r): 0 for t in TRANSPORTS for r in RESULTS}
        self.malformed = dict.fromkeys(MALFORMED_REASONS, 0)
        self.truncated = 0
        #: TCP connections closed at accept because tcp_connections_max were open.
        self.tcp_refused = 0
        self.tcp_connections = 0

    def count(self, transport: str, reply: Reply) -> None:
        self.queries[(transport, reply.result)] += 1
        if reply.malformed is not None:
            self.malformed[reply.malformed] += 1
        if reply.truncated:
            self.truncated += 1

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        queries = CounterMetricFamily("regctl_dns_queries", "DNS packets received, by transport and result",
                                      labels=["transport", "result"])
        for (transport, result), n in sorted(list(self.queries.items())):
            queries.add_metric([transport, result], n)
        yield queries
        malformed = CounterMetricFamily("regctl_dns_malformed",
                                        "DNS packets answered FORMERR or dropped, by reason", labels=["reason"])
        for reason, n in sorted(list(self.malformed.items())):
            malformed.add_metric([reason], n)
        yield malformed
        yield CounterMetricFamily("regctl_dns_truncated", "UDP answers cut to fit, with the TC flag set",
                                  value=self.truncated)
        yield CounterMetricFamily("regctl_dns_tcp_refused", "DNS TCP connections closed at accept (limit)",
                                  value=self.tcp_refused)
        yield GaugeMetricFamily("regctl_dns_tcp_connections", "open DNS TCP connections",
                                value=self.tcp_connections)
