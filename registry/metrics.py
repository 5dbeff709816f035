"""Prometheus metrics of one node, in a registry of its own (no module globals)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["NodeMetrics"]

_LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_BATCH_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class NodeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.raft_role = Gauge(
            "regctl_raft_role", "1 for the role this node is in", ["role"], registry=r
        )
        self.raft_term = Gauge("regctl_raft_term", "current Raft term", registry=r)
        self.raft_commit_index = Gauge("regctl_raft_commit_index", "Raft commit index", registry=r)
        self.raft_applied_index = Gauge("regctl_raft_applied_index", "last applied Raft index", registry=r)
        self.revision = Gauge("regctl_revision", "registry revision this node has applied", registry=r)
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
        self.requests = Counter(
            "regctl_requests", "client requests by op and result code", ["op", "code"], registry=r
        )
        self.request_seconds = Histogram(
            "regctl_request_seconds", "client request latency by op", ["op"],
            buckets=_LATENCY_BUCKETS_S, registry=r,
        )
        self.connections = Gauge("regctl_client_connections", "open client connections", registry=r)
        self.bad_frames = Counter(
            "regctl_bad_frames", "connections closed for a broken byte stream", registry=r
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

        #: Label children by (op, code) and op: ``labels()`` costs a few us per call
        #: (argument checks, a lock, a dict lookup), paid twice per request.
        self._request_counts: dict[tuple[str, str], Any] = {}
        self._request_latency: dict[str, Any] = {}

    def request_done(self, op: str, code: str, seconds: float) -> None:
        """Count one finished client request and observe its latency (``op`` must be bounded)."""
        counter = self._request_counts.get((op, code))
        if counter is None:
            counter = self._request_counts[(op, code)] = self.requests.labels(op=op, code=code)
        counter.inc()
        latency = self._request_latency.get(op)
        if latency is None:
            latency = self._request_latency[op] = self.request_seconds.labels(op=op)
        latency.observe(seconds)

    def set_role(self, role: str) -> None:
        for name in ("leader", "follower", "candidate"):
            self.raft_role.labels(role=name).set(1 if name == role else 0)
