"""One registry node: wires replication, proposer, API server and HTTP together."""

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
from registry.fsm.ops import REQUEST_OPS
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
from registry.server.metrics import NodeMetrics
from registry.server.proposer import Proposer
from registry.server.server import APIServer
from registry.server.watch_service import WatchService

__all__ = ["Node", "run_node"]

log = logging.getLogger("registry.server.node")


class Node:
    def __init__(self, config: NodeConfig) -> None:
        config.validate()
        self.config = config
        self.metrics = NodeMetrics()
        self.holder = StateHolder()
        self.raft: RaftNode | None = None
        self.api: RegistryAPI | None = None
        self._server: APIServer | None = None
        self._http: HTTPServer | None = None
        self._dns: DnsServer | None = None
        #: Consul's HTTP API, when configured; its change tracker sees every applied batch from the start.
        self.consul: ConsulHTTP | None = None
        self._consul_tracker: ChangeTracker | None = None
        self.consul_stats = ConsulStats()
        self.metrics.registry.register(self.consul_stats)
        self.dns_stats = DnsStats()
        self.metrics.registry.register(self.dns_stats)
        self._proposer: Proposer | None = None
        self.leases: LeaseService | None = None
        self.watches: WatchService | None = None
        self._waiters: RevisionWaiters | None = None
        self.acl: AclService | None = None
        self._recorder: IncarnationRecorder | None = None
        self._gc: GcTuner | None = None
        #: Raft messages already counted in regctl_raft_messages_sent (the cipher keeps the running total).
        self._messages_reported = 0
        #: Leader changes already added to the metrics counter (see _refresh_metrics).
        self._leader_changes_reported = 0
        self.incarnation: str | None = None
        self.guard: IncarnationGuard | None = None

    async def start(self) -> None:
        config = self.config
        loop = asyncio.get_running_loop()
        if config.dev and not config.cluster_key:
            log.warning(
                "DEV MODE: Raft traffic is neither encrypted nor authenticated; anyone who can reach "
                "%s can run code on this host. Never use --dev outside a laptop.",
                config.raft_addr,
            )
        self._gc = GcTuner(GcSettings())
        self._gc.start(loop)
        seed = load_seed(Path(config.data_dir))
        if seed is not None:
            # A data dir made by `regctl snapshot restore`: start from its state.
            self.holder.state = seed
            self.holder.high_water = seed.revision
            log.info("starting from restored backup at revision %d", seed.revision)
        incarnation, created = load_or_create(Path(config.data_dir))
        if created:
            log.info("new data directory %s: incarnation %s", config.data_dir, incarnation)
        self.incarnation = incarnation
        holder = self.holder
        self.guard = guard = IncarnationGuard(
            # Raft thread, on the applied state; a dict lookup, so no lock needed under the GIL.
            lambda addr: holder.state.identity(addr),
            on_refused=lambda addr: self.metrics.raft_peers_refused.inc(),
        )
        self.raft = raft = RaftNode(config, self.holder, incarnation, guard, on_fsync=self.metrics.wal.observe)
        self.metrics.wal.torn_tails_truncated = raft.wal.torn_tails_truncated
        if seed is not None:
            # Make our own snapshot (which includes the seed) soon, so nodes
            # that join later receive the seeded state, not an empty log.
            raft.forceLogCompaction()
        self._waiters = waiters = RevisionWaiters(loop)
        # One hand-off per applied batch, in apply order: everything that
        # reacts to applied events runs on the loop, never in the Raft thread.
        def applied(revision: int, events: list[dict[str, Any]], entry_bytes: int) -> None:
            loop.call_soon_threadsafe(self._on_applied, revision, events, entry_bytes)

        def restored() -> None:
            loop.call_soon_threadsafe(self._on_restore)

        raft.add_listener(applied)
        raft.add_restore_hook(restored)
        with self.holder.lock:
            # Read after the listener is in place: every later batch reaches the hub.
            start_revision = self.holder.state.revision
        self.watches = WatchService(WatchHub(start_revision, config.watch_limits), self.holder, self.metrics)
        if config.consul_http:
            self._consul_tracker = ChangeTracker(start_revision)
        self._proposer = Proposer(
            raft,
            loop,
            self.metrics,
            batch_commands_max=config.batch_commands_max,
            batch_bytes_max=config.batch_bytes_max,
            batch_inflight_max=config.batch_inflight_max,
            pending_max=config.proposals_pending_max,
            timeout_s=config.request_timeout_s,
        )
        info = NodeInfo(
            node_id=config.node_id,
            api_addr=config.api_addr,
            raft_addr=config.raft_addr,
            http_addr=config.http_addr,
            api_by_raft=dict(config.peer_apis),
        )
        self.api = RegistryAPI(info, self.holder, raft, self._proposer, waiters, config.request_timeout_s)
        if config.failpoints.unsafe_local_reads:
            log.warning("UNSAFE: linearizable reads are served locally without the read barrier (failpoint "
                        "unsafe-local-reads, dev mode); only for jepsen-lite's self-test")
            self.api.unsafe_local_reads = True
        # A cut-off leader answers keepalives until it steps down (leader
        # fallback) plus a heartbeat; a new leader's countdowns start that late.
        self.leases = LeaseService(raft, self.holder, self._proposer, self.metrics, self._leader_api,
                                   handover_grace_s=config.raft.leader_fallback_s + config.raft.heartbeat_s)
        self.api.add_handler("lease_keepalive", self.leases.keepalive)
        self.api.add_handler("lease_keepalive_batch", self.leases.keepalive_batch)
        self.api.add_handler("lease_ttl", self.leases.time_to_live)
        self.leases.start()
        self.members = MembershipService(raft, self.holder, self._proposer, self._leader_api, config.api_addr,
                                         dict(config.peer_apis), guard)
        self.api.add_handler("member_list", self.members.list)
        self.api.add_handler("member_add", self.members.add)
        self.api.add_handler("member_remove", self.members.remove)
        self.api.add_handler("member_transfer_leader", self.members.transfer_leader)
        self._recorder = IncarnationRecorder(raft, self.holder, self._proposer, guard, incarnation)
        self._recorder.start()
        self.acl = AclService(self.api, self.holder, self._proposer, self.metrics, enabled=config.acl)
        if config.acl:
            log.info("ACLs enabled: every request needs a token (bootstrap with `regctl acl bootstrap`)")
            self.watches.acl = self.acl
        self._server = APIServer(
            self.api, self.metrics, frame_bytes_max=config.frame_bytes_max, connections_max=config.connections_max,
            connections_per_source_max=config.connections_per_source_max, hello_timeout_s=config.hello_timeout_s,
            hello_bytes_max=config.hello_bytes_max,
            acl=self.acl if config.acl else None, ssl_context=server_ssl_context(config),
        )
        self.api.extra_status = self._live_numbers
        # Keepalives touch only the leader's memory: answered inline, no task per request.
        self._server.add_inline("lease_keepalive", self.leases.keepalive_now)
        self._server.add_inline("lease_keepalive_batch", self.leases.keepalive_batch_now)
        self._server.add_stream("watch", self.watches.watch)
        self._server.add_stream("snapshot_save", self.api.snapshot_save)
        served = self.api.ops | set(self._server.streams)
        # Every op a client may send is in the op table and has exactly one handler here.
        assert served == REQUEST_OPS, f"ops without a handler or outside the op table: {sorted(served ^ REQUEST_OPS)}"
        self._server.known_ops.update(REQUEST_OPS)
        self._http = HTTPServer(self.metrics, self._refresh_metrics, self._readiness, self.api.handle,
                                acl=self.acl if config.acl else None)
        await self._server.start(config.api_host, config.api_port)
        await self._http.start(config.http_host, config.http_port)
        self._dns = await start_dns(config.dns, self.holder, self.dns_stats, acl=config.acl)
        if config.consul_http and self._consul_tracker is not None:
            raft_ = raft

            def leader() -> str | None:
                return raft_.raft_status().leader

            self.consul = ConsulHTTP(self.api, self.holder, self.watches.hub, self._consul_tracker,
                                     Site(node_address=config.consul_http[0][0]), leader=leader,
                                     leader_api=self._leader_api, acl=self.acl if config.acl else None,
                                     stats=self.consul_stats)
            await self.consul.start(config.consul_http)
            log.info("node %s serving Consul's HTTP API on %s", config.node_id, ", ".join(config.consul_http_addrs))
        log.info(
            "node %s serving: api %s, raft %s, http %s, data %s",
            config.node_id, config.api_addr, config.raft_addr, config.http_addr, config.data_dir,
        )

    def _on_applied(self, revision: int, events: list[dict[str, Any]], entry_bytes: int) -> None:
        if self._waiters is not None:
            self._waiters.applied(revision)
        if self._consul_tracker is not None:
            # Before the hub: a blocking query woken by these events must find them tracked.
            self._consul_tracker.observe(revision, events)
        if self.watches is not None:
            self.watches.publish(revision, events, entry_bytes)
        if events and self.leases is not None:
            self.leases.on_events(events)

    def _on_restore(self) -> None:
        if self._consul_tracker is not None:
            with self.holder.lock:
                restored_revision = self.holder.state.revision
            self._consul_tracker.restored(restored_revision)
        if self.watches is not None:
            self.watches.restored()
        if self.leases is not None:
            self.leases.on_restore()

    def _live_numbers(self) -> dict[str, Any]:
        return {
            "requests_total": self.metrics.requests.total(),
            "leases": len(self.leases.keeper) if self.leases is not None else 0,
            "watchers": self.watches.hub.watchers if self.watches is not None else 0,
            "pending_proposals": self._proposer.pending if self._proposer is not None else 0,
            "incarnation": self.incarnation,
            # Whether this node's applied state records this data directory for its Raft address: false on a
            # new member until the leader records it, and on a wiped node its peers refuse.
            "incarnation_recorded": self.incarnation is not None
            and self.holder.state.identity(self.config.raft_addr) == self.incarnation,
        }

    def _leader_api(self) -> str | None:
        if self.raft is None:
            return None
        leader = self.raft.raft_status().leader
        if leader is None:
            return None
        if leader == self.config.raft_addr:
            return self.config.api_addr
        known = dict(self.config.peer_apis).get(leader)
        if known is None:
            with self.holder.lock:
                try:
                    known = str(self.holder.state.get_key(MEMBER_KEY_PREFIX + leader)["value"])
                except RegistryError:
                    known = None
        return known

    def _refresh_metrics(self) -> None:
        if self.raft is None:
            return
        st = self.raft.raft_status()
        self.metrics.set_role(st.role)
        self.metrics.raft_term.set(st.term)
        self.metrics.raft_commit_index.set(st.commit_index)
        self.metrics.raft_applied_index.set(st.applied_index)
        self.metrics.revision.set(self.holder.state.revision)
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
        if self.raft is None:
            return False, {"reason": "starting"}
        st = self.raft.raft_status()
        ready = st.leader is not None and st.applied_index >= st.commit_index
        return ready, {
            "role": st.role,
            "leader": st.leader,
            "commit_index": st.commit_index,
            "applied_index": st.applied_index,
        }

    async def stop(self) -> None:
        if self._recorder is not None:
            await self._recorder.stop()
        if self.leases is not None:
            await self.leases.stop()
        if self._server is not None:
            await self._server.stop()
        if self._http is not None:
            await self._http.stop()
        if self._dns is not None:
            await self._dns.stop()
        if self.consul is not None:
            await self.consul.stop()
        if self._proposer is not None:
            self._proposer.close()
        if self.raft is not None:
            self.raft.stop()
        if self._gc is not None:
            self._gc.stop()
        log.info("node %s stopped", self.config.node_id)


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


async def _serve(node: Node) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await node.start()
    await stop.wait()
    await node.stop()


def run_node(config: NodeConfig) -> None:
    """Run one node in the foreground until SIGINT or SIGTERM."""
    node = Node(config)

    def term() -> int:
        return node.raft.term() if node.raft is not None else 0

    configure_logging(config.node_id, config.log_format, config.log_level, lambda: node.holder.state.revision, term)
    uvloop.install()
    try:
        asyncio.run(_serve(node))
    except LogRefused as exc:
        # A corrupted or foreign Raft log: one line that names the file and offset, not a traceback.
        print(f"regctl server: refusing to start: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
