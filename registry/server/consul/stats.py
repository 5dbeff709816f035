"""Counters of the Consul HTTP API, rendered by prometheus-client only at scrape time (as DnsStats)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["ConsulStats"]


class ConsulStats(Collector):
    """``regctl_consul_blocking_queries`` (waiting now) and ``regctl_consul_blocking_wakeups``."""

    def __init__(self) -> None:
        self.waiting = 0
        #: Answers recomputed because an applied event matched a waiting query's selector; a wake-up
        #: whose answer kept its index goes back to waiting (the gap to answers sent is the waste).
        self.wakeups = 0

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        yield GaugeMetricFamily("regctl_consul_blocking_queries", "Consul blocking queries waiting now",
                                value=self.waiting)
        yield CounterMetricFamily("regctl_consul_blocking_wakeups",
                                  "Consul blocking queries woken by a matching event to recompute their answer",
                                  value=self.wakeups)
