"""One registry node: ``build_node`` wires replication, proposer, API server and HTTP together."""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import sys
from pathlib import Path
from typing import Any

import uvloop

from registry.config import NodeConfig
from registry.errors import RegistryError
from registry.fsm.limits import StateLimits
from registry.fsm.ops import REQUEST_OPS
from registry.fsm.state import RegistryState
from registry.fsm.watch import WatchHub
from registry.raft.incarnation import IncarnationGuard, load_or_create
from registry.raft.log import LogRefused
from registry.raft.membership import MEMBER_KEY_PREFIX, IncarnationRecorder, MembershipService
from registry.raft.node import RaftNode, StateHolder
from registry.server.acl_service import AclService
from registry.server.api import NodeInfo, RegistryAPI, RevisionWaiters
from registry.server.backup import load_seed
from registry.server.consul.catalog import Site
from registry.server.consul.http import ConsulHTTP
from registry.server.consul.stats import ConsulStats
from registry.server.consul.tracking import ChangeTracker
from registry.server.dns.server import DnsServer, start_dns
from registry.server.dns.stats import DnsStats
from registry.server.gc_tuning import GcSettings, GcTuner
from registry.server.http import HTTPServer
from registry.server.lease_service import LeaseService
from registry.server.logs import configure_logging
from registry.server.metrics import NodeMetrics, RaftWireStats
from registry.server.proposer import Proposer
from registry.server.server import APIServer
from registry.server.watch_service import WatchService

__all__ = ["Node", "build_node", "run_node"]

log = logging.getLogger("registry.server.node")


class Node:
    """A node's parts, every one built by ``build_node`` before anything serves.

    Construction happens in one place (as hashicorp's ``NewRaft(conf, fsm,
    logs, stable, snaps, trans)`` takes everything it needs): ``Node`` gets
    finished parts and only starts and stops the listeners.  The front ends
    that the configuration leaves off (DNS, Consul HTTP) are None.
    """

    def __init__(self, *, config: NodeConfig, metrics: NodeMetrics, holder: StateHolder, incarnation: str,
                 raft: RaftNode, waiters: RevisionWaiters, watches: WatchService, proposer: Proposer,
                 api: RegistryAPI, leases: LeaseService, members: MembershipService, recorder: IncarnationRecorder,
                 acl: AclService, server: APIServer, http: HTTPServer, gc: GcTuner, dns_stats: DnsStats,
                 consul_tracker: ChangeTracker | None, consul: ConsulHTTP | None) -> None:
        self.config = config
        self.metrics = metrics
        self.holder = holder
        self.incarnation = incarnation
        self.raft = raft
        self.watches = watches
        self.api = api
        self.leases = leases
        self.members = members
        self.acl = acl
        self.dns_stats = dns_stats
        #: Consul's HTTP API, when configured; its change tracker sees every applied batch from the start.
        self.consul = consul
        self._consul_tracker = consul_tracker
        self._waiters = waiters
        self._proposer = proposer
        self._recorder = recorder
        self._server = server
        self._http = http
        self._gc = gc
        #: Started by ``start`` (it binds as it is built); None while stopped or when not configured.
        self._dns: DnsServer | None = None
        #: Raft messages already counted in regctl_raft_messages_sent (the cipher keeps the running total).
        self._messages_reported = 0
        #: Leader changes already added to the metrics counter (see _refresh_metrics).
        self._leader_changes_reported = 0

    async def start(self) -> None:
        """Start the background work and every listener; the parts were built by ``build_node``."""
        config = self.config
        self._gc.start(asyncio.get_running_loop())
        self.leases.start()
        self._recorder.start()
        await self._server.start(config.api_host, config.api_port)
        await self._http.start(config.http_host, config.http_port, ssl_context=http_ssl_context(config))
        self._dns = await start_dns(config.dns, self.holder, self.dns_stats, acl=config.acl)
        if self.consul is not None:
            await self.consul.start(config.consul_http, ssl_context=consul_ssl_context(config))
            log.info("node %s serving Consul's HTTP API on %s", config.node_id, ", ".join(config.consul_http_addrs))
        log.info(
            "node %s serving: api %s, raft %s, http %s, data %s",
            config.node_id, config.api_addr, config.raft_addr, config.http_addr, config.data_dir,
        )

    def _on_applied(self, revision: int, events: list[dict[str, Any]], entry_bytes: int) -> None:
        self._waiters.applied(revision)
        self._proposer.applied()
        if self._consul_tracker is not None:
            # Before the hub: a blocking query woken by these events must find them tracked.
            self._consul_tracker.observe(revision, events)
        self.watches.publish(revision, events, entry_bytes)
        if events:
            self.leases.on_events(events)

    def _on_restore(self) -> None:
        if self._consul_tracker is not None:
            with self.holder.lock:
                restored_revision = self.holder.state.revision
            self._consul_tracker.restored(restored_revision)
        self.watches.restored()
        self.leases.on_restore()
        self._proposer.applied()

    def _live_numbers(self) -> dict[str, Any]:
        return {
            "requests_total": self.metrics.requests.total(),
            "leases": len(self.leases.keeper),
            "watchers": self.watches.hub.watchers,
            "pending_proposals": self._proposer.pending,
            "incarnation": self.incarnation,
            # Faults switched on for tests (registry.failpoints): never silent.
            "failpoints": self.config.failpoints.active,
            # Whether this node's applied state records this data directory for its Raft address: false on a
            # new member until the leader records it, and on a wiped node its peers refuse.
            "incarnation_recorded": self.holder.state.identity(self.config.raft_addr) == self.incarnation,
        }

    def _refresh_metrics(self) -> None:
        st = self.raft.raft_status()
        self.metrics.set_role(st.role)
        self.metrics.raft_term.set(st.term)
        self.metrics.raft_commit_index.set(st.commit_index)
        self.metrics.raft_applied_index.set(st.applied_index)
        self.metrics.revision.set(self.holder.state.revision)
        self.metrics.state_bytes.set(self.holder.state.state_bytes)
        self.metrics.state_bytes_max.set(self.holder.state.state_bytes_budget)
        self.metrics.leader_contact_age.set(self.raft.leader_contact_age_s())
        changes = self.raft.leader_changes
        if changes > self._leader_changes_reported:
            self.metrics.leader_changes.inc(changes - self._leader_changes_reported)
            self._leader_changes_reported = changes
        sent = self.raft.messages_sent
        if sent > self._messages_reported:
            self.metrics.raft_messages_sent.inc(sent - self._messages_reported)
            self._messages_reported = sent

    def _readiness(self) -> tuple[bool, dict[str, Any]]:
        st = self.raft.raft_status()
        ready = st.leader is not None and st.applied_index >= st.commit_index
        return ready, {
            "role": st.role,
            "leader": st.leader,
            "commit_index": st.commit_index,
            "applied_index": st.applied_index,
        }

    async def stop(self) -> None:
        await self._recorder.stop()
        await self.leases.stop()
        await self._server.stop()
        await self._http.stop()
        if self._dns is not None:
            await self._dns.stop()
        if self.consul is not None:
            await self.consul.stop()
        self._proposer.close()
        self.raft.stop()
        self._gc.stop()
        log.info("node %s stopped", self.config.node_id)


def _leader_api(config: NodeConfig, raft: RaftNode, holder: StateHolder) -> str | None:
    """The leader's client API address, if known (for NOT_LEADER hints)."""
    leader = raft.raft_status().leader
    if leader is None:
        return None
    if leader == config.raft_addr:
        return config.api_addr
    known = dict(config.peer_apis).get(leader)
    if known is None:
        with holder.lock:
            try:
                known = str(holder.state.get_key(MEMBER_KEY_PREFIX + leader)["value"])
            except RegistryError:
                known = None
    return known


def build_node(config: NodeConfig) -> Node:
    """Build every part of a node, in dependency order, on the running loop; nothing listens yet.

    The Raft node starts its own thread as it is built and may apply entries
    at once: the apply listener is registered before the watch hub reads its
    start revision, so no batch is missed, and it hands each batch to the loop,
    where nothing runs until this function (which never awaits) has returned
    the node the callbacks use.
    """
    config.validate()
    loop = asyncio.get_running_loop()
    if config.dev and not config.cluster_key:
        log.warning(
            "DEV MODE: Raft traffic is neither encrypted nor authenticated; anyone who can reach "
            "%s can run code on this host. Never use --dev outside a laptop.",
            config.raft_addr,
        )
    metrics = NodeMetrics()
    consul_stats = ConsulStats()
    metrics.registry.register(consul_stats)
    dns_stats = DnsStats()
    metrics.registry.register(dns_stats)
    # The same on every replica, whatever each node's flags: --max-state-bytes reaches the state only
    # through the leader's replicated announcement (LeaseService), never through a local default.
    limits = StateLimits()
    holder = StateHolder(RegistryState(limits))
    seed = load_seed(Path(config.data_dir), limits)
    if seed is not None:
        # A data dir made by `regctl snapshot restore`: start from its state.
        holder.state = seed
        holder.high_water = seed.revision
        log.info("starting from restored backup at revision %d", seed.revision)
    incarnation, created = load_or_create(Path(config.data_dir))
    if created:
        log.info("new data directory %s: incarnation %s", config.data_dir, incarnation)
    guard = IncarnationGuard(
        # Raft thread, on the applied state; a dict lookup, so no lock needed under the GIL.
        lambda addr: holder.state.identity(addr),
        on_refused=lambda addr: metrics.raft_peers_refused.inc(),
    )
    raft = RaftNode(config, holder, incarnation, guard, on_fsync=metrics.wal.observe)
    metrics.wal.torn_tails_truncated = raft.wal.torn_tails_truncated
    metrics.registry.register(RaftWireStats(raft.wire_counters))
    if seed is not None:
        # Make our own snapshot (which includes the seed) soon, so nodes
        # that join later receive the seeded state, not an empty log.
        raft.snapshot_soon()

    node: Node | None = None

    # One hand-off per applied batch, in apply order: everything that
    # reacts to applied events runs on the loop, never in the Raft thread.
    def on_applied(revision: int, events: list[dict[str, Any]], entry_bytes: int) -> None:
        assert node is not None, "an applied batch reached the loop before build_node returned"
        node._on_applied(revision, events, entry_bytes)

    def on_restore() -> None:
        assert node is not None, "a snapshot install reached the loop before build_node returned"
        node._on_restore()

    def applied(revision: int, events: list[dict[str, Any]], entry_bytes: int) -> None:
        loop.call_soon_threadsafe(on_applied, revision, events, entry_bytes)

    def restored() -> None:
        loop.call_soon_threadsafe(on_restore)

    raft.add_listener(applied)
    raft.add_restore_hook(restored)
    with holder.lock:
        # Read after the listener is in place: every later batch reaches the hub.
        start_revision = holder.state.revision
    waiters = RevisionWaiters(loop)
    watches = WatchService(WatchHub(start_revision, config.watch_limits), holder, metrics)
    consul_tracker = ChangeTracker(start_revision) if config.consul_http else None
    proposer = Proposer(
        raft,
        loop,
        metrics,
        batch_commands_max=config.batch_commands_max,
        batch_bytes_max=config.batch_bytes_max,
        batch_inflight_max=config.batch_inflight_max,
        pending_max=config.proposals_pending_max,
        timeout_s=config.request_timeout_s,
        # The leader of the current term has announced itself (its leader_epoch applied here).
        ready=lambda: holder.state.epoch >= raft.term(),
        leader_known=raft.leader_known,
    )
    info = NodeInfo(
        node_id=config.node_id,
        api_addr=config.api_addr,
        raft_addr=config.raft_addr,
        http_addr=config.http_addr,
        api_by_raft=dict(config.peer_apis),
    )

    def leader_api() -> str | None:
        return _leader_api(config, raft, holder)

    api = RegistryAPI(info, holder, raft, proposer, waiters, config.request_timeout_s)
    if config.failpoints.active:
        log.warning("UNSAFE: failpoints on (%s): this node misbehaves on purpose, for tests only",
                    ", ".join(config.failpoints.active))
    if config.failpoints.unsafe_local_reads:
        log.warning("UNSAFE: linearizable reads are served locally without the read barrier (failpoint "
                    "unsafe-local-reads); only for jepsen-lite's self-test")
        api.unsafe_local_reads = True
    # A cut-off leader answers keepalives until it steps down (leader
    # fallback) plus a heartbeat; a new leader's countdowns start that late.
    leases = LeaseService(raft, holder, proposer, metrics, leader_api,
                          handover_grace_s=config.raft.leader_fallback_s + config.raft.heartbeat_s,
                          state_bytes_max=config.state_bytes_max)
    api.add_handler("lease_keepalive", leases.keepalive)
    api.add_handler("lease_keepalive_batch", leases.keepalive_batch)
    api.add_handler("lease_ttl", leases.time_to_live)
    members = MembershipService(raft, holder, proposer, leader_api, config.api_addr, dict(config.peer_apis), guard)
    api.add_handler("member_list", members.list)
    api.add_handler("member_add", members.add)
    api.add_handler("member_remove", members.remove)
    api.add_handler("member_transfer_leader", members.transfer_leader)
    recorder = IncarnationRecorder(raft, holder, proposer, guard, incarnation)
    acl = AclService(api, holder, proposer, metrics, enabled=config.acl)
    if config.acl:
        log.info("ACLs enabled: every request needs a token (bootstrap with `regctl acl bootstrap`)")
        watches.acl = acl
    server = APIServer(
        api, metrics, frame_bytes_max=config.frame_bytes_max, connections_max=config.connections_max,
        connections_per_source_max=config.connections_per_source_max, hello_timeout_s=config.hello_timeout_s,
        hello_bytes_max=config.hello_bytes_max,
        acl=acl if config.acl else None, ssl_context=server_ssl_context(config),
    )
    # Keepalives touch only the leader's memory: answered inline, no task per request.
    server.add_inline("lease_keepalive", leases.keepalive_now)
    server.add_inline("lease_keepalive_batch", leases.keepalive_batch_now)
    server.add_stream("watch", watches.watch)
    server.add_stream("snapshot_save", api.snapshot_save)
    served = api.ops | set(server.streams)
    # Every op a client may send is in the op table and has exactly one handler here.
    assert served == REQUEST_OPS, f"ops without a handler or outside the op table: {sorted(served ^ REQUEST_OPS)}"
    server.known_ops.update(REQUEST_OPS)
    # The HTTP port and status read the node's live numbers: called on the loop, after build_node returns.
    def refresh_metrics() -> None:
        assert node is not None
        node._refresh_metrics()

    def readiness() -> tuple[bool, dict[str, Any]]:
        assert node is not None
        return node._readiness()

    def live_numbers() -> dict[str, Any]:
        assert node is not None
        return node._live_numbers()

    api.extra_status = live_numbers
    http = HTTPServer(metrics, refresh_metrics, readiness, api.handle, acl=acl if config.acl else None)
    consul: ConsulHTTP | None = None
    if consul_tracker is not None:
        consul = ConsulHTTP(api, holder, watches.hub, consul_tracker, Site(node_address=config.consul_http[0][0]),
                            leader=lambda: raft.raft_status().leader, leader_api=leader_api,
                            acl=acl if config.acl else None, stats=consul_stats)
    node = Node(config=config, metrics=metrics, holder=holder, incarnation=incarnation, raft=raft, waiters=waiters,
                watches=watches, proposer=proposer, api=api, leases=leases, members=members, recorder=recorder,
                acl=acl, server=server, http=http, gc=GcTuner(GcSettings()), dns_stats=dns_stats,
                consul_tracker=consul_tracker, consul=consul)
    return node


def server_ssl_context(config: NodeConfig) -> ssl.SSLContext | None:
    """TLS for the client API when a certificate is configured; client certs required with a client CA."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(config.tls_cert), str(config.tls_key))
    if config.tls_client_ca is not None:
        ctx.load_verify_locations(str(config.tls_client_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def http_ssl_context(config: NodeConfig) -> ssl.SSLContext | None:
    """TLS for the HTTP endpoints when --http-tls-cert is given: they accept Bearer tokens."""
    return _serving_context(config.http_tls_cert, config.http_tls_key)


def consul_ssl_context(config: NodeConfig) -> ssl.SSLContext | None:
    """TLS for Consul's HTTP API when --consul-http-tls-cert is given: it accepts tokens too."""
    return _serving_context(config.consul_tls_cert, config.consul_tls_key)


def _serving_context(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    if cert is None or key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


async def _serve(config: NodeConfig, built: list[Node]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    node = build_node(config)
    built.append(node)  # the log lines' revision and term come from it from now on
    await node.start()
    await stop.wait()
    await node.stop()


def run_node(config: NodeConfig) -> None:
    """Run one node in the foreground until SIGINT or SIGTERM."""
    built: list[Node] = []

    def revision() -> int:
        return built[0].holder.state.revision if built else 0

    def term() -> int:
        return built[0].raft.term() if built else 0

    configure_logging(config.node_id, config.log_format, config.log_level, revision, term)
    uvloop.install()
    try:
        asyncio.run(_serve(config, built))
    except LogRefused as exc:
        # A corrupted or foreign Raft log: one line that names the file and offset, not a traceback.
        print(f"regctl server: refusing to start: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
