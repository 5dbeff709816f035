"""Prometheus metrics of one node, in a registry of its own (no module globals).

Besides our own series the registry holds prometheus-client's process
(``process_*``: CPU, RSS, open fds, start time), GC (``python_gc_*``) and
platform (``python_info``) collectors, and ``regctl_build_info``.  No series
has a ``*_created`` sample: the hand-rendered counters (``RequestStats``)
never had one, so the library's are switched off (see ``NodeMetrics``).
"""

from __future__ import annotations

import importlib.metadata
import platform
from bisect import bisect_left
from collections.abc import Iterator
from typing import ClassVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from registry.build import build_kind

__all__ = ["NodeMetrics", "RaftWireStats", "RequestStats", "WalStats", "build_info"]

_LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_BATCH_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class _OpLatency:
    __slots__ = ("buckets", "sum_s")

    def __init__(self, bucket_count: int) -> None:
        #: Requests per bucket (not cumulative); the last one is above every bound.
        self.buckets = [0] * bucket_count
        self.sum_s = 0.0


class RequestStats(Collector):
    """``regctl_requests_total{op,code}`` and ``regctl_request_seconds{op}``, kept in plain ints and floats.

    prometheus-client's ``Counter.inc`` and ``Histogram.observe`` take a lock
    and check their arguments on every call: with ``labels()`` cached that
    was still 10-12% of the leader's CPU at 256 reads in flight.  Every
    request ends on the node's event loop thread, so here a request is a
    dict lookup, an int add and a bucket search, and prometheus-client only
    renders the numbers (``collect``, at scrape time).  A scrape from another
    thread reads counts that are at most a few requests behind, never torn:
    it copies the dicts first (atomic under the GIL).
    """

    def __init__(self, buckets_s: tuple[float, ...]) -> None:
        self._bounds = tuple(sorted(buckets_s))
        self._counts: dict[tuple[str, str], int] = {}
        self._latency: dict[str, _OpLatency] = {}

    def count(self, op: str, code: str, n: int = 1) -> None:
        """Count ``n`` finished requests of ``op`` with result ``code`` (not timed)."""
        key = (op, code)
        self._counts[key] = self._counts.get(key, 0) + n

    def done(self, op: str, code: str, seconds: float) -> None:
        """Count one finished request and observe its latency."""
        key = (op, code)
        self._counts[key] = self._counts.get(key, 0) + 1
        latency = self._latency.get(op)
        if latency is None:
            latency = self._latency[op] = _OpLatency(len(self._bounds) + 1)
        # Prometheus buckets are "less than or equal": the first bound >= seconds.
        latency.buckets[bisect_left(self._bounds, seconds)] += 1
        latency.sum_s += seconds

    def total(self) -> int:
        return sum(list(self._counts.values()))

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        counts = CounterMetricFamily("regctl_requests", "client requests by op and result code",
                                     labels=["op", "code"])
        for (op, code), n in sorted(list(self._counts.items())):
            counts.add_metric([op, code], n)
        yield counts
        latency = HistogramMetricFamily("regctl_request_seconds", "client request latency by op", labels=["op"])
        for op, stats in sorted(list(self._latency.items())):
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for bound, n in zip((*self._bounds, float("inf")), list(stats.buckets), strict=True):
                cumulative += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            latency.add_metric([op], buckets, stats.sum_s)
        yield latency


#: etcd's buckets for its wal_fsync_duration_seconds (1 ms doubling to 8 s), with finer ones below
#: 1 ms: an fdatasync of a small append takes ~0.07 ms on a local SSD.
_FSYNC_BUCKETS_S = (0.0001, 0.00025, 0.0005, *(0.001 * 2 ** i for i in range(14)))
_FSYNC_RECORDS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class WalStats(Collector):
    """The Raft log's fsyncs: ``regctl_wal_fsync_duration_seconds`` (etcd's name), records per fsync
    (``regctl_wal_fsync_records``) and ``regctl_wal_torn_tails_truncated`` at start.

    ``observe`` runs in the Raft thread after every fdatasync, so it is two
    bucket searches and some adds on plain lists (see ``RequestStats``); a
    scrape copies them.
    """

    def __init__(self) -> None:
        self._seconds_bounds = _FSYNC_BUCKETS_S
        self._records_bounds = _FSYNC_RECORDS_BUCKETS
        self._seconds = [0] * (len(self._seconds_bounds) + 1)
        self._records = [0] * (len(self._records_bounds) + 1)
        self._seconds_sum = 0.0
        self._records_sum = 0
        #: Torn tails the log cut when this node started.
        self.torn_tails_truncated = 0

    def observe(self, seconds: float, records: int) -> None:
        self._seconds[bisect_left(self._seconds_bounds, seconds)] += 1
        self._seconds_sum += seconds
        self._records[bisect_left(self._records_bounds, records)] += 1
        self._records_sum += records

    @staticmethod
    def _histogram(name: str, doc: str, bounds: tuple[float, ...], counts: list[int],
                   total: float) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, doc)
        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for bound, n in zip((*bounds, float("inf")), counts, strict=True):
            cumulative += n
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        family.add_metric([], buckets, total)
        return family

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        yield self._histogram("regctl_wal_fsync_duration_seconds", "fdatasync of the Raft log, in seconds",
                              self._seconds_bounds, list(self._seconds), self._seconds_sum)
        yield self._histogram("regctl_wal_fsync_records", "Raft log records made durable by one fdatasync",
                              tuple(float(b) for b in self._records_bounds), list(self._records),
                              float(self._records_sum))
        torn = CounterMetricFamily("regctl_wal_torn_tails_truncated",
                                   "torn records cut from the end of the Raft log when this node started")
        torn.add_metric([], self.torn_tails_truncated)
        yield torn


class RaftWireStats(Collector):
    """``regctl_raft_wire_refused_total{reason}``: what the Raft port's guards refused or survived
    (registry/raft/tcp.py counts them in the Raft thread; a scrape reads the plain ints)."""

    #: reason label -> WireCounters attribute.
    REASONS: ClassVar[dict[str, str]] = {"frame_too_large": "frames_refused", "message_refused": "messages_refused",
               "handshake_expired": "handshakes_expired", "handshake_evicted": "handshakes_evicted",
               "accept_error": "accept_errors"}

    def __init__(self, counters: object) -> None:
        self._counters = counters

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("regctl_raft_wire_refused",
                                     "Raft port: frames, messages and connections refused, and failed accepts",
                                     labels=["reason"])
        for reason, attribute in self.REASONS.items():
            family.add_metric([reason], getattr(self._counters, attribute))
        yield family


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"  # running from a checkout that was never installed


def build_info() -> dict[str, str]:
    """The labels of ``regctl_build_info``: what this node runs."""
    return {"version": _version("raft-registry"), "python": platform.python_version(),
            "pysyncobj": _version("pysyncobj"), "build": build_kind()}


class NodeMetrics:
    def __init__(self) -> None:
        # prometheus-client's one switch for *_created is process-wide (PROMETHEUS_DISABLE_CREATED_SERIES
        # does the same at import): set here, where a node's metrics are made, so every counter and
        # histogram of the process renders like the hand-rendered ones, which have none.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # The library's default collectors, in this node's registry (they live in the global one by default).
        ProcessCollector(registry=r)
        GCCollector(registry=r)
        PlatformCollector(registry=r)
        self.build_info = Gauge("regctl_build_info", "1, labelled with the versions this node runs",
                                ["version", "python", "pysyncobj", "build"], registry=r)
        self.build_info.labels(**build_info()).set(1)
        self.leader_changes = Counter(
            "regctl_raft_leader_changes", "times this node saw the Raft leader change (to a known leader)",
            registry=r,
        )
        self.leader_contact_age = Gauge(
            "regctl_raft_leader_contact_age_seconds",
            "on a follower, seconds since it last heard from the leader; 0 on the leader",
            registry=r,
        )
        self.raft_role = Gauge(
            "regctl_raft_role", "1 for the role this node is in", ["role"], registry=r
        )
        self.raft_term = Gauge("regctl_raft_term", "current Raft term", registry=r)
        self.raft_commit_index = Gauge("regctl_raft_commit_index", "Raft commit index", registry=r)
        self.raft_applied_index = Gauge("regctl_raft_applied_index", "last applied Raft index", registry=r)
        self.revision = Gauge("regctl_revision", "registry revision this node has applied", registry=r)
        self.state_bytes = Gauge(
            "regctl_state_bytes", "estimated bytes of services, instances and keys (budget: state_bytes_max)",
            registry=r,
        )
        self.state_bytes_max = Gauge("regctl_state_bytes_max", "the state byte budget", registry=r)
        self.proposals = Counter("regctl_proposals", "Raft entries proposed by this node", registry=r)
        self.raft_peers_refused = Counter(
            "regctl_raft_peers_refused",
            "Raft messages refused because the sender's data directory is not the one recorded for its address",
            registry=r,
        )
        self.raft_messages_sent = Counter(
            "regctl_raft_messages_sent", "Raft messages sent to peers (entries, heartbeats, replies, votes)", registry=r
        )
        self.batch_commands = Histogram(
            "regctl_batch_commands", "commands per proposed Raft entry", buckets=_BATCH_BUCKETS, registry=r
        )
        self.proposal_seconds = Histogram(
            "regctl_proposal_seconds",
            "time from proposing an entry to its local apply",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.requests = RequestStats(_LATENCY_BUCKETS_S)
        r.register(self.requests)
        self.wal = WalStats()
        r.register(self.wal)
        self.connections = Gauge("regctl_client_connections", "open client connections", registry=r)
        self.bad_frames = Counter(
            "regctl_bad_frames", "connections closed for a broken byte stream", registry=r
        )
        self.connections_refused = Counter(
            "regctl_client_connections_refused",
            "client connections refused or closed before their hello: total or per-source cap reached, "
            "no hello within the deadline, too many bytes before the hello",
            ["reason"], registry=r,
        )
        self.leases = Gauge("regctl_leases", "live leases", registry=r)
        self.keepalives = Counter("regctl_lease_keepalives", "lease keepalives served", registry=r)
        self.lease_expiries = Counter("regctl_lease_expiries", "leases expired by this leader", registry=r)
        self.lease_expiries_deferred = Counter(
            "regctl_lease_expiries_deferred", "expiries deferred by the mass-expiry guard", registry=r
        )
        self.watchers = Gauge("regctl_watchers", "open watch streams", registry=r)
        self.watches_distinct = Gauge("regctl_watches_distinct", "distinct watch selections", registry=r)
        self.watch_events = Counter("regctl_watch_events_sent", "watch events sent", registry=r)
        self.acl_denials = Counter(
            "regctl_acl_denials", "requests refused by ACLs, by reason", ["reason"], registry=r
        )
        self.watch_resyncs = Counter("regctl_watch_resyncs", "watch resyncs sent", ["reason"], registry=r)

    def request_done(self, op: str, code: str, seconds: float) -> None:
        """Count one finished client request and observe its latency (``op`` must be bounded)."""
        self.requests.done(op, code, seconds)

    def set_role(self, role: str) -> None:
        for name in ("leader", "follower", "candidate"):
            self.raft_role.labels(role=name).set(1 if name == role else 0)
