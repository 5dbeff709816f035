"""``regctl up``: a local cluster of node processes in one command."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click

from registry.client import SyncClient
from registry.errors import RegistryError
from registry.server.ports import ports_free

#: Largest local cluster: more nodes than this on one machine only adds Raft traffic.
NODES_MAX = 9
#: How long the nodes get to stop on SIGTERM before SIGKILL.
STOP_GRACE_S = 10.0
#: How long to wait for a leader before saying the cluster is not ready.
READY_WAIT_S = 30.0


@dataclass(frozen=True)
class LocalNode:
    node_id: str
    api: str
    raft: str
    http: str
    data_dir: Path


def plan(nodes: int, data_dir: Path, base_port: int, host: str = "127.0.0.1") -> list[LocalNode]:
    """Node i (1-based): API base+i, Raft base+100+i, HTTP base+200+i."""
    return [
        LocalNode(f"n{i}", f"{host}:{base_port + i}", f"{host}:{base_port + 100 + i}",
                  f"{host}:{base_port + 200 + i}", data_dir / f"n{i}")
        for i in range(1, nodes + 1)
    ]


def ensure_cluster_key(data_dir: Path) -> Path:
    """One random key per local cluster, kept with its data (0600) so restarts reuse it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "cluster.key"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    return path


def _port_free(addr: str) -> bool:
    host, _, port = addr.rpartition(":")
    return ports_free([int(port)], host)


def node_command(node: LocalNode, peers: list[LocalNode], key_file: Path | None, log_format: str) -> list[str]:
    cmd = [
        sys.executable, "-m", "cli", "server", "--id", node.node_id, "--data-dir", str(node.data_dir),
        "--raft", node.raft, "--peers", ",".join(p.raft for p in peers if p is not node),
        "--api", node.api, "--http", node.http, "--log-format", log_format,
    ]
    for p in peers:
        if p is not node:
            cmd += ["--peer-api", f"{p.raft}={p.api}"]
    if key_file is not None:
        cmd += ["--cluster-key-file", str(key_file)]
    else:
        cmd += ["--dev"]
    return cmd


@click.command()
@click.option("--nodes", type=click.IntRange(1, NODES_MAX), default=3, show_default=True)
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("./regctl-data"),
              show_default=True)
@click.option("--base-port", type=click.IntRange(1024, 65000), default=7000, show_default=True)
@click.option("--dev", is_flag=True, help="No cluster key (INSECURE). By default a key is made in the data dir.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True)
def up(nodes: int, data_dir: Path, base_port: int, dev: bool, log_format: str) -> None:
    """Start a local cluster in the foreground; Ctrl-C stops it. Data persists in --data-dir."""
    data_dir = data_dir.resolve()
    members = plan(nodes, data_dir, base_port)
    busy = [a for m in members for a in (m.api, m.raft, m.http) if not _port_free(a)]
    if busy:
        raise click.UsageError(f"address(es) already in use: {', '.join(busy)} (another cluster running? "
                               f"use --base-port)")
    key_file = None if dev else ensure_cluster_key(data_dir)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        for m in members:
            m.data_dir.mkdir(parents=True, exist_ok=True)
            log_file = open(m.data_dir / "node.log", "ab")
            procs[m.node_id] = subprocess.Popen(
                node_command(m, members, key_file, log_format), stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            log_file.close()
        click.echo(f"raft-registry: {nodes} node(s), data in {data_dir}")
        for m in members:
            click.echo(f"  {m.node_id}  api {m.api}  raft {m.raft}  http http://{m.http}  "
                       f"log {m.data_dir / 'node.log'}")
        endpoints = [m.api for m in members]
        leader = _wait_ready(endpoints, lambda: stopping)
        if leader:
            click.echo(f"ready: leader {leader}. Try: regctl --endpoints {','.join(endpoints)} status")
        elif not stopping:
            click.echo("warning: no leader yet; see the node logs", err=True)
        click.echo("Ctrl-C to stop.")
        while not stopping:
            for node_id, proc in procs.items():
                if proc.poll() is not None:
                    click.echo(f"error: node {node_id} exited with code {proc.returncode}; stopping the cluster "
                               f"(log: {data_dir / node_id / 'node.log'})", err=True)
                    stopping = True
                    break
            time.sleep(0.2)
    finally:
        codes = _stop_all(procs)
        click.echo("stopped.")
    if any(code not in (0, -signal.SIGTERM) for code in codes.values()):
        sys.exit(1)


def _wait_ready(endpoints: list[str], stop: object) -> str | None:
    deadline = time.monotonic() + READY_WAIT_S
    with SyncClient(endpoints, timeout_s=1.0, connect_timeout_s=0.3) as client:
        while time.monotonic() < deadline and not stop():  # type: ignore[operator]
            try:
                for status in client.cluster_status():
                    if status.get("reachable") and status.get("role") == "leader":
                        return str(status.get("id"))
            except RegistryError:
                pass
            time.sleep(0.2)
    return None


def _stop_all(procs: dict[str, subprocess.Popen[bytes]]) -> dict[str, int]:
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    codes: dict[str, int] = {}
    for node_id, proc in procs.items():
        try:
            codes[node_id] = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes[node_id] = proc.wait()
    return codes
