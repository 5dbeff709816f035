"""RequestStats renders the same Prometheus series the library's own Counter and Histogram would."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from registry.build import build_kind
from registry.server.metrics import NodeMetrics, RequestStats

BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def _series(registry: CollectorRegistry) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in generate_latest(registry).decode().splitlines():
        if line.startswith("#") or "_created" in line:
            continue
        name, value = line.rsplit(" ", 1)
        out[name] = float(value)
    return out


def _labels_sorted(series: dict[str, float]) -> dict[str, float]:
    """Label order in the text format is the collector's choice; compare label sets."""
    out = {}
    for name, value in series.items():
        if "{" in name:
            base, labels = name[:-1].split("{", 1)
            name = base + "{" + ",".join(sorted(labels.split(","))) + "}"
        out[name] = value
    return out


OBSERVATIONS = [
    # (op, code, seconds): on, below, between and above the bucket bounds
    ("register", "OK", 0.0005),
    ("register", "OK", 0.0004),
    ("register", "OK", 0.0011),
    ("register", "TIMEOUT", 5.0),
    ("register", "OK", 7.5),
    ("service_get", "OK", 0.0),
    ("service_get", "NOT_FOUND", 0.003),
]


def test_request_stats_match_prometheus_counter_and_histogram() -> None:
    ours = CollectorRegistry()
    stats = RequestStats(BUCKETS)
    ours.register(stats)
    theirs = CollectorRegistry()
    counter = Counter("regctl_requests", "client requests by op and result code", ["op", "code"], registry=theirs)
    histogram = Histogram("regctl_request_seconds", "client request latency by op", ["op"], buckets=BUCKETS,
                          registry=theirs)
    for op, code, seconds in OBSERVATIONS:
        stats.done(op, code, seconds)
        counter.labels(op=op, code=code).inc()
        histogram.labels(op=op).observe(seconds)
    stats.count("lease_keepalive", "OK", 3)
    counter.labels(op="lease_keepalive", code="OK").inc(3)
    assert _labels_sorted(_series(ours)) == pytest.approx(_labels_sorted(_series(theirs)))
    assert stats.total() == len(OBSERVATIONS) + 3


def test_node_metrics_expose_request_series() -> None:
    metrics = NodeMetrics()
    metrics.request_done("register", "OK", 0.003)
    text = generate_latest(metrics.registry).decode()
    assert 'regctl_requests_total{code="OK",op="register"} 1.0' in text
    assert 'regctl_request_seconds_bucket{le="0.005",op="register"} 1.0' in text
    assert 'regctl_request_seconds_bucket{le="0.002",op="register"} 0.0' in text


def test_node_metrics_hold_the_default_collectors_build_info_and_no_created_series() -> None:
    metrics = NodeMetrics()
    metrics.proposals.inc()
    metrics.leader_changes.inc()
    text = generate_latest(metrics.registry).decode()
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if not line.startswith("#")}
    # prometheus-client's process, GC and platform collectors, in the node's own registry.
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds",
                 "process_start_time_seconds", "python_gc_objects_collected_total", "python_info"):
        assert name in names, name
    assert "regctl_raft_leader_changes_total" in names and "regctl_raft_leader_contact_age_seconds" in names
    build = next(line for line in text.splitlines() if line.startswith("regctl_build_info{"))
    assert build.endswith(" 1.0") and 'pysyncobj="0.3.17"' in build and 'python="3.' in build, build
    assert f'build="{build_kind()}"' in build, build
    # One behaviour for every counter and histogram: no *_created samples (the hand-rendered
    # regctl_requests_total never had one).
    assert not [line for line in text.splitlines() if "_created" in line]
