"""WalStats renders what prometheus_client's own Histogram and Counter would, under etcd's metric name."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from registry.server.metrics import _FSYNC_BUCKETS_S, _FSYNC_RECORDS_BUCKETS, NodeMetrics, WalStats


def _series(registry: CollectorRegistry) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in generate_latest(registry).decode().splitlines():
        if line.startswith("#") or "_created" in line:
            continue
        name, value = line.rsplit(" ", 1)
        out[name] = float(value)
    return out


#: (seconds, records): on, below, between and above the bounds.
OBSERVATIONS = [(0.00007, 1), (0.0001, 2), (0.00011, 3), (0.004, 40), (0.5, 4096), (9.0, 5000), (0.0, 1)]


def test_wal_stats_match_prometheus_histograms_and_counter() -> None:
    ours = CollectorRegistry()
    stats = WalStats()
    ours.register(stats)
    theirs = CollectorRegistry()
    seconds = Histogram("regctl_wal_fsync_duration_seconds", "fdatasync of the Raft log, in seconds",
                        buckets=_FSYNC_BUCKETS_S, registry=theirs)
    records = Histogram("regctl_wal_fsync_records", "Raft log records made durable by one fdatasync",
                        buckets=_FSYNC_RECORDS_BUCKETS, registry=theirs)
    torn = Counter("regctl_wal_torn_tails_truncated",
                   "torn records cut from the end of the Raft log when this node started", registry=theirs)
    for s, n in OBSERVATIONS:
        stats.observe(s, n)
        seconds.observe(s)
        records.observe(n)
    stats.torn_tails_truncated = 2
    torn.inc(2)
    assert _series(ours) == pytest.approx(_series(theirs))


def test_node_metrics_serve_the_wal_series() -> None:
    metrics = NodeMetrics()
    metrics.wal.observe(0.0002, 5)
    text = generate_latest(metrics.registry).decode()
    assert "regctl_wal_fsync_duration_seconds_count 1.0" in text
    assert "regctl_wal_fsync_records_sum 5.0" in text
    assert "regctl_wal_torn_tails_truncated_total 0.0" in text
