"""Prometheus metrics of one agent, in a registry of its own (no module globals).

Per upstream endpoint: connections proxied, connect failures, ejections,
bytes each way, open connections.  Per upstream: panic (0/1), endpoints
known and healthy, client connections that found no endpoint.  Per local
instance: the status the agent reports, and lease keepalive outcomes.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["AgentMetrics", "EndpointMetrics"]


@dataclass(slots=True)
class EndpointMetrics:
    """The label children of one (upstream, endpoint): looked up once, not per connection."""

    connections: Counter
    failures: Counter
    ejections: Counter
    bytes_sent: Counter
    bytes_received: Counter
    active: Gauge


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ep = ["upstream", "endpoint"]
        self.connections = Counter("regctl_agent_upstream_connections",
                                   "client connections proxied to an endpoint", ep, registry=r)
        self.failures = Counter("regctl_agent_upstream_connect_failures",
                                "failed connect attempts to an endpoint (each rerouted if attempts remain)", ep,
                                registry=r)
        self.ejections = Counter("regctl_agent_upstream_ejections", "outlier ejections of an endpoint", ep,
                                 registry=r)
        self.bytes = Counter("regctl_agent_upstream_bytes", "bytes relayed, by direction (sent: to the endpoint)",
                             [*ep, "direction"], registry=r)
        self.active = Gauge("regctl_agent_upstream_active_connections", "open proxied connections", ep, registry=r)
        self.panic = Gauge("regctl_agent_upstream_panic",
                           "1 while the healthy share is under the panic threshold (routing to all)", ["upstream"],
                           registry=r)
        self.endpoints = Gauge("regctl_agent_upstream_endpoints", "endpoints in the table, by state",
                               ["upstream", "state"], registry=r)
        self.no_endpoint = Counter("regctl_agent_upstream_unrouted",
                                   "client connections closed without reaching any endpoint, by reason",
                                   ["upstream", "reason"], registry=r)
        self.ejections_limited = Counter("regctl_agent_upstream_ejections_limited",
                                         "ejections skipped because max_ejection_percent was reached",
                                         ["upstream"], registry=r)
        self.check_status = Gauge("regctl_agent_check_status", "1 for the status a local instance's check reports",
                                  ["service", "id", "status"], registry=r)
        self.keepalives = Counter("regctl_agent_lease_keepalives", "lease keepalives by result", ["result"],
                                  registry=r)
        self.registered = Gauge("regctl_agent_registered", "1 while the local instances are registered", registry=r)
        self.watch_revision = Gauge("regctl_agent_watch_revision", "registry revision an upstream's table reflects",
                                    ["upstream"], registry=r)
        self._children: dict[tuple[str, str], EndpointMetrics] = {}

    def endpoint(self, upstream: str, endpoint_id: str) -> EndpointMetrics:
        key = (upstream, endpoint_id)
        children = self._children.get(key)
        if children is None:
            children = EndpointMetrics(
                connections=self.connections.labels(upstream, endpoint_id),
                failures=self.failures.labels(upstream, endpoint_id),
                ejections=self.ejections.labels(upstream, endpoint_id),
                bytes_sent=self.bytes.labels(upstream, endpoint_id, "sent"),
                bytes_received=self.bytes.labels(upstream, endpoint_id, "received"),
                active=self.active.labels(upstream, endpoint_id),
            )
            self._children[key] = children
        return children

    def prune(self, upstream: str, keep: set[str]) -> None:
        """Drop the series of endpoints not in ``keep`` (the table, plus any still relaying).

        Without this, instance churn would grow the metrics without bound.
        """
        for key in [k for k in self._children if k[0] == upstream and k[1] not in keep]:
            del self._children[key]
            for metric in (self.connections, self.failures, self.ejections, self.active):
                metric.remove(*key)
            for direction in ("sent", "received"):
                self.bytes.remove(*key, direction)
