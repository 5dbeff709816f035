"""Node configuration: one frozen value built at the edge (CLI, env) and passed down.

``NodeConfig.validate()`` checks each field and the relations between them
(heartbeat < election timeout, read timeout > election timeout, ...), so a
node refuses to start with a setting that would make it flap rather than
discovering it under load.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from registry.errors import InvalidArgument
from registry.failpoints import Failpoints
from registry.server.dns.settings import DnsSettings

__all__ = ["NodeConfig", "HubLimits", "RaftTiming", "parse_hostport", "format_hostport"]



def parse_hostport(text: str, *, what: str = "address") -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[v6]:PORT`` too) or raise InvalidArgument naming ``what``."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise InvalidArgument(f"{what} must be HOST:PORT, got {text!r}")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise InvalidArgument(f"{what} port must be 1..65535, got {port}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals (127.0.0.0/8, ::1); any other name may resolve anywhere."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


#: Longest Raft address (bytes of UTF-8) a node accepts for itself.
RAFT_ADDRESS_BYTES_MAX = 255



@dataclass(frozen=True, slots=True)
class HubLimits:
    #: History kept for resumes: events, and their encoded bytes (while no watch is open, the
    #: bytes of the Raft entries they came from plus EVENT_CHARGE_BYTES each: see
    #: WatchHub.publish).  The watch messages built from the history for watches that start
    #: behind the head are cached in up to as many bytes again (see WatchHub.subscribe).
    history_events_max: int = 100_000
    history_bytes_max: int = 64 << 20
    #: Events queued for one watcher before it is resynced instead.
    queue_events_max: int = 10_000
    #: Encoded bytes queued for one watcher (the chunks are shared with the
    #: other watchers of its selector, but a watcher this far behind is
    #: resynced all the same: catching up by snapshot is cheaper).
    queue_bytes_max: int = 64 << 20
    #: Watchers on one node.
    watchers_max: int = 100_000

    def validate(self) -> None:
        if (self.history_events_max < 1 or self.history_bytes_max < 1 or self.queue_events_max < 1
                or self.queue_bytes_max < 1):
            raise InvalidArgument("watch limits must be positive")


@dataclass(frozen=True, slots=True)
class RaftTiming:
    """pysyncobj timers, tuned for a failover in about a second.

    pysyncobj's defaults ship entries only every 100 ms and keep a cut-off
    leader in office for 30 s; these values were measured on a 2-core machine
    with three nodes on loopback (see README "Performance").
    """

    #: Heartbeat period; must stay well under the election timeout.
    heartbeat_s: float = 0.05
    #: Followers start an election after a random timeout in [min, max].
    election_timeout_min_s: float = 0.4
    election_timeout_max_s: float = 0.8
    #: A leader that heard from no majority for this long steps down.
    leader_fallback_s: float = 1.0
    #: TCP connect timeout and reconnect period between peers.
    connect_timeout_s: float = 1.0
    reconnect_period_s: float = 0.3
    #: Compaction: snapshot after this many log entries or this many seconds.
    #: Entries are whole batches, so 10k entries can hold millions of writes.
    compaction_entries: int = 10_000
    compaction_period_s: float = 600.0
    #: How long the leader may hold back an AppendEntries round that would
    #: carry nothing but a new commit index, hoping the next entry goes first
    #: and carries it (0 sends at once).  Followers apply (and serve stale
    #: reads, watches and their own linearizable reads) up to this much later;
    #: serial writes save half their Raft messages.
    commit_notify_delay_s: float = 0.002

    def validate(self) -> None:
        if not 0 < self.heartbeat_s < self.election_timeout_min_s / 3:
            raise InvalidArgument("heartbeat_s must be positive and under a third of election_timeout_min_s")
        if not self.election_timeout_min_s < self.election_timeout_max_s:
            raise InvalidArgument("election_timeout_min_s must be below election_timeout_max_s")
        if self.leader_fallback_s < self.election_timeout_min_s:
            raise InvalidArgument("leader_fallback_s must be at least election_timeout_min_s")
        if not 0 <= self.commit_notify_delay_s < self.heartbeat_s:
            raise InvalidArgument("commit_notify_delay_s must be at least 0 and under heartbeat_s")
        if self.compaction_entries < 2:
            raise InvalidArgument("compaction_entries must be at least 2")
        if self.compaction_period_s <= 0 or self.connect_timeout_s <= 0 or self.reconnect_period_s <= 0:
            raise InvalidArgument("timeouts and periods must be positive")


@dataclass(frozen=True, slots=True)
class RaftWireLimits:
    """Bounds on what the Raft port accepts from a connection (enforced in ``registry/raft/tcp.py``)."""

    #: Largest frame before the connection's first authenticated message: the
    #: handshake is a 32-byte random key and a Raft address (255 bytes at most)
    #: inside the cipher's ~300-byte header.
    handshake_message_bytes_max: int = 4096
    #: Largest frame after it: one AppendEntries carries at least one whole log
    #: entry, and an entry is one proposer batch (``NodeConfig.batch_bytes_max``).
    message_bytes_max: int = 256 << 20
    #: A connection that has not authenticated by then is closed (a slow drip
    #: keeps pysyncobj's idle timer alive forever).
    handshake_deadline_s: float = 5.0
    #: Accepted connections still in their handshake, at most; the oldest is
    #: closed to make room, so a flood delays a peer's reconnect by at most
    #: its own handshake's round trip.
    unauthenticated_connections_max: int = 64
    #: Bytes read from one connection per poller event, so one fast sender
    #: cannot keep the Raft thread in its read loop (the poller is level-
    #: triggered: what is left is read on the next pass).
    read_bytes_per_event_max: int = 4 << 20
    #: After an accept error such as EMFILE the listener stops polling this long
    #: (a level-triggered poller would otherwise spin on it), then resumes.
    accept_pause_s: float = 0.2

    def validate(self) -> None:
        if not 512 <= self.handshake_message_bytes_max <= 1 << 20:
            raise InvalidArgument("handshake_message_bytes_max must be 512 B..1 MiB")
        if not self.handshake_message_bytes_max <= self.message_bytes_max <= (1 << 31) - 1:
            raise InvalidArgument("message_bytes_max must be at least handshake_message_bytes_max and under 2 GiB")
        if not 0 < self.handshake_deadline_s <= 60:
            raise InvalidArgument("handshake_deadline_s must be in (0, 60]")
        if not 1 <= self.unauthenticated_connections_max <= 10_000:
            raise InvalidArgument("unauthenticated_connections_max must be 1..10000")
        if not 64 << 10 <= self.read_bytes_per_event_max <= 256 << 20:
            raise InvalidArgument("read_bytes_per_event_max must be 64 KiB..256 MiB")
        if not 0 < self.accept_pause_s <= 10:
            raise InvalidArgument("accept_pause_s must be in (0, 10]")


@dataclass(frozen=True, slots=True)
class NodeConfig:
    node_id: str
    data_dir: Path
    raft_addr: str
    peers: tuple[str, ...]
    api_host: str = "127.0.0.1"
    api_port: int = 7001
    http_host: str = "127.0.0.1"
    http_port: int = 7201
    #: Consul's HTTP API (registry.server.consul, docs/consul.md) on each of these (host, port); none: off.
    #: ``regctl up`` gives node 1 a second one on 127.0.0.1:8500, where the tools look by default.
    consul_http: tuple[tuple[str, int], ...] = ()
    #: Shared secret for Raft traffic. pysyncobj unpickles what peers send, so
    #: an unauthenticated Raft port is remote code execution: required unless dev.
    cluster_key: str | None = None
    #: (raft address, API address) of every other node, for NOT_LEADER hints.
    peer_apis: tuple[tuple[str, str], ...] = ()
    dev: bool = False
    raft: RaftTiming = field(default_factory=RaftTiming)
    #: What the Raft port accepts from a connection before and after it authenticates.
    raft_wire: RaftWireLimits = field(default_factory=RaftWireLimits)
    #: Group commit: at most this many commands in one Raft entry, and at most
    #: this many entries in flight; the next batch forms while these commit.
    batch_commands_max: int = 2048
    #: ... and at most this many bytes of them (msgpack), so one entry (and the Raft message
    #: carrying it) stays bounded: 2048 commands of a 1 MiB frame would be 2 GiB.
    batch_bytes_max: int = 16 << 20
    batch_inflight_max: int = 2
    #: Pending proposals above this are refused (LIMIT_EXCEEDED) instead of
    #: growing memory without bound while the cluster has no leader.
    proposals_pending_max: int = 50_000
    #: How long a write or linearizable read waits for commit before TIMEOUT.
    request_timeout_s: float = 5.0
    #: Largest frame accepted from a client, in bytes.
    frame_bytes_max: int = 1 << 20
    #: Clients allowed at once; more are closed at accept.
    connections_max: int = 10_000
    #: Budget of the replicated state in bytes (--max-state-bytes).  A leader announces its value with
    #: its epoch and every replica enforces the announced one, so replicas always refuse the same
    #: writes; give every node the same value, or the budget changes with the leader.
    state_bytes_max: int = 2 << 30
    #: Clients allowed at once from one address, so one host cannot take every slot.
    connections_per_source_max: int = 1024
    #: A client that has not sent its hello this long after connecting is closed, and so is
    #: one that sends more than this many bytes before it (a hello is well under 1 KiB).
    hello_timeout_s: float = 5.0
    hello_bytes_max: int = 64 << 10
    log_format: str = "text"
    log_level: str = "INFO"
    #: Watch hub bounds: history kept for resumes, and each watcher's queue.
    watch_limits: HubLimits = field(default_factory=HubLimits)
    #: Enforce ACLs on the client API (default deny once on; off by default).
    acl: bool = False
    #: Client API TLS: certificate chain and key; with a client CA, client certificates are required.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    #: HTTP endpoints (/metrics, JSON, Bearer tokens) over TLS: certificate chain and key.
    http_tls_cert: Path | None = None
    http_tls_key: Path | None = None
    #: Serve Consul's HTTP API (``consul_http``) over TLS with this certificate chain and key: it takes tokens.
    consul_tls_cert: Path | None = None
    consul_tls_key: Path | None = None
    #: DNS for services (A, AAAA, SRV) on UDP and TCP; None: off.
    dns: DnsSettings | None = None
    #: Faults for tests (registry.failpoints); a node with any on says so loudly at start and in its status.
    failpoints: Failpoints = field(default_factory=Failpoints)
    #: ``--unsafe-no-fsync``: the Raft log is written but never fsynced, so a power loss can lose
    #: acknowledged writes (registry/raft/log.py).  For tests and benchmarks only; every default is durable.
    unsafe_no_fsync: bool = False

    def validate(self) -> None:
        self.raft.validate()
        self.raft_wire.validate()
        self.watch_limits.validate()
        if not self.node_id or len(self.node_id) > 64:
            raise InvalidArgument("node id must be 1..64 characters")
        raft_host, _ = parse_hostport(self.raft_addr, what="raft address")
        if len(self.raft_addr.encode()) > RAFT_ADDRESS_BYTES_MAX:
            # It travels in the header of every Raft message (RaftCipher), which has one byte for its length.
            raise InvalidArgument(f"raft address longer than {RAFT_ADDRESS_BYTES_MAX} bytes")
        if self.dev and not is_loopback_host(raft_host):
            # --dev's cluster key is public and pysyncobj unpickles what peers send: off loopback
            # that is remote code execution for anyone who can reach the port.
            raise InvalidArgument(f"--dev runs only with a loopback raft address (127.0.0.1, ::1, localhost), "
                                  f"got {self.raft_addr!r}: give a cluster key to listen on a network")
        for peer in self.peers:
            parse_hostport(peer, what="peer address")
        if self.raft_addr in self.peers:
            raise InvalidArgument("peers must not include this node's own raft address")
        if len(set(self.peers)) != len(self.peers):
            raise InvalidArgument("peers contain a duplicate")
        if not self.dev and not self.cluster_key:
            raise InvalidArgument(
                "a cluster key is required (--cluster-key-file or REGCTL_CLUSTER_KEY); "
                "only --dev runs without one, and then anyone who can reach the Raft port can run code"
            )
        if self.cluster_key is not None and len(self.cluster_key) < 16:
            raise InvalidArgument("cluster key must be at least 16 characters")
        if self.request_timeout_s <= self.raft.election_timeout_max_s:
            raise InvalidArgument("request_timeout_s must exceed the election timeout, or every failover times out")
        if not 1 <= self.batch_commands_max <= 100_000:
            raise InvalidArgument("batch_commands_max must be 1..100000")
        if not 1 <= self.batch_inflight_max <= 64:
            raise InvalidArgument("batch_inflight_max must be 1..64")
        if not 4096 <= self.frame_bytes_max <= 64 << 20:
            raise InvalidArgument("frame_bytes_max must be 4 KiB..64 MiB")
        # Above frame_bytes_max so any one command fits; under 128 MiB so an entry stays well inside
        # the largest Raft message a peer accepts (registry.raft.tcp.RaftWireLimits.message_bytes_max).
        if self.state_bytes_max < 1 << 20:
            raise InvalidArgument("state_bytes_max must be at least 1 MiB")
        if not 1 <= self.connections_per_source_max <= self.connections_max:
            raise InvalidArgument("connections_per_source_max must be 1..connections_max")
        if not 0 < self.hello_timeout_s <= 60:
            raise InvalidArgument("hello_timeout_s must be in (0, 60]")
        if not 1024 <= self.hello_bytes_max <= self.frame_bytes_max:
            raise InvalidArgument("hello_bytes_max must be at least 1 KiB and at most frame_bytes_max")
        if not self.frame_bytes_max <= self.batch_bytes_max <= 128 << 20:
            raise InvalidArgument("batch_bytes_max must be at least frame_bytes_max and at most 128 MiB")
        if self.batch_bytes_max + (1 << 20) > self.raft_wire.message_bytes_max:
            # An entry travels in one Raft message with its framing and the cipher's header.
            raise InvalidArgument("raft_wire.message_bytes_max must exceed batch_bytes_max by at least 1 MiB")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidArgument("--tls-cert and --tls-key go together")
        if (self.http_tls_cert is None) != (self.http_tls_key is None):
            raise InvalidArgument("--http-tls-cert and --http-tls-key go together")
        if (self.consul_tls_cert is None) != (self.consul_tls_key is None):
            raise InvalidArgument("--consul-http-tls-cert and --consul-http-tls-key go together")
        if self.consul_tls_cert is not None and not self.consul_http:
            raise InvalidArgument("--consul-http-tls-cert needs --consul-http")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise InvalidArgument("--tls-client-ca needs --tls-cert and --tls-key")
        if self.log_format not in ("text", "json"):
            raise InvalidArgument("log format must be text or json")
        if self.dns is not None:
            self.dns.validate()
            dns_addr = format_hostport(self.dns.host, self.dns.port)
            if dns_addr in (self.api_addr, self.http_addr, *self.consul_http_addrs):
                # The DNS TCP listener would take the port the API or an HTTP server needs.
                raise InvalidArgument(f"--dns {dns_addr} must differ from --api, --http and --consul-http")
        consul_addrs = self.consul_http_addrs
        if len(set(consul_addrs)) != len(consul_addrs):
            raise InvalidArgument("--consul-http addresses contain a duplicate")
        for (_, port), addr in zip(self.consul_http, consul_addrs, strict=True):
            if not 0 < port < 65536:
                raise InvalidArgument(f"--consul-http {addr}: port must be 1..65535")
            if addr in (self.api_addr, self.http_addr):
                raise InvalidArgument(f"--consul-http {addr} must differ from --api and --http")

    @property
    def consul_http_addrs(self) -> list[str]:
        return [format_hostport(host, port) for host, port in self.consul_http]

    @property
    def api_addr(self) -> str:
        return format_hostport(self.api_host, self.api_port)

    @property
    def http_addr(self) -> str:
        return format_hostport(self.http_host, self.http_port)

    def replace(self, **changes: object) -> NodeConfig:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]
