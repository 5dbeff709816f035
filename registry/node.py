"""One registry node: wires replication, proposer, API server and HTTP together."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

import uvloop

from .api import NodeInfo, RegistryAPI, RevisionWaiters
from .config import NodeConfig
from .http import HTTPServer
from .logs import configure_logging
from .metrics import NodeMetrics
from .proposer import Proposer
from .replication import RaftNode, StateHolder
from .server import APIServer

__all__ = ["Node", "run_node"]

log = logging.getLogger("registry.node")


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
        self._proposer: Proposer | None = None

    async def start(self) -> None:
        config = self.config
        loop = asyncio.get_running_loop()
        if config.dev and not config.cluster_key:
            log.warning(
                "DEV MODE: Raft traffic is neither encrypted nor authenticated; anyone who can reach "
                "%s can run code on this host. Never use --dev outside a laptop.",
                config.raft_addr,
            )
        self.raft = raft = RaftNode(config, self.holder)
        waiters = RevisionWaiters(loop)
        raft.add_listener(lambda revision, events: waiters.applied(revision))
        self._proposer = Proposer(
            raft,
            loop,
            self.metrics,
            batch_commands_max=config.batch_commands_max,
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
        self._server = APIServer(
            self.api, self.metrics, frame_bytes_max=config.frame_bytes_max, connections_max=config.connections_max
        )
        self._server.known_ops.update(self.api.ops)
        self._http = HTTPServer(self.metrics, self._refresh_metrics, self._readiness)
        await self._server.start(config.api_host, config.api_port)
        await self._http.start(config.http_host, config.http_port)
        log.info(
            "node %s serving: api %s, raft %s, http %s, data %s",
            config.node_id, config.api_addr, config.raft_addr, config.http_addr, config.data_dir,
        )

    def _refresh_metrics(self) -> None:
        if self.raft is None:
            return
        st = self.raft.raft_status()
        self.metrics.set_role(st.role)
        self.metrics.raft_term.set(st.term)
        self.metrics.raft_commit_index.set(st.commit_index)
        self.metrics.raft_applied_index.set(st.applied_index)
        self.metrics.revision.set(self.holder.state.revision)

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
        if self._server is not None:
            await self._server.stop()
        if self._http is not None:
            await self._http.stop()
        if self._proposer is not None:
            self._proposer.close()
        if self.raft is not None:
            self.raft.destroy()
        log.info("node %s stopped", self.config.node_id)


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
        return int(node.raft.raftCurrentTerm) if node.raft is not None else 0

    configure_logging(config.node_id, config.log_format, config.log_level, lambda: node.holder.state.revision, term)
    uvloop.install()
    asyncio.run(_serve(node))
