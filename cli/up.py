"""``regctl up``: a local cluster of node processes in one command."""

from __future__ import annotations

import dataclasses
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click

from registry.client import SyncClient
from registry.errors import RegistryError
from registry.server.ports import ports_free

from .restart_policy import RestartPolicy
from .supervisor import NodeSpec, Supervisor, regctl_argv

#: Largest local cluster: more nodes than this on one machine only adds Raft traffic.
NODES_MAX = 9
#: --deaths-max's ceiling: more restarts a minute than this is a crash loop, not supervision.
DEATHS_PER_MINUTE_MAX = 60
#: How long to wait for a leader before saying the cluster is not ready.
READY_WAIT_S = 30.0


@dataclass(frozen=True)
class LocalNode:
    node_id: str
    api: str
    raft: str
    http: str
    data_dir: Path
    #: DNS (UDP and TCP); empty: none.
    dns: str = ""
    #: Consul's HTTP API listeners (base+300+i; node 1 also 127.0.0.1:8500 when free).
    consul: tuple[str, ...] = ()


def plan(nodes: int, data_dir: Path, base_port: int, host: str = "127.0.0.1") -> list[LocalNode]:
    """Node i (1-based): API base+i, Raft base+100+i, HTTP base+200+i, Consul HTTP base+300+i, DNS base+400+i."""
    return [
        LocalNode(f"n{i}", f"{host}:{base_port + i}", f"{host}:{base_port + 100 + i}",
                  f"{host}:{base_port + 200 + i}", data_dir / f"n{i}", f"{host}:{base_port + 400 + i}",
                  (f"{host}:{base_port + 300 + i}",))
        for i in range(1, nodes + 1)
    ]


#: Where Consul's tools look by default; node 1 serves Consul's HTTP API there too when it is free.
CONSUL_DEFAULT_ADDR = "127.0.0.1:8500"


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


def node_command(node: LocalNode, peers: list[LocalNode], key_file: Path | None, log_format: str,
                 unsafe_no_fsync: bool = False) -> list[str]:
    # Started as the `regctl` console script, so that `ps` shows each node as `regctl server`.
    cmd = [
        *regctl_argv(), "server", "--id", node.node_id, "--data-dir", str(node.data_dir),
        "--raft", node.raft, "--peers", ",".join(p.raft for p in peers if p is not node),
        "--api", node.api, "--http", node.http, "--log-format", log_format,
    ]
    for p in peers:
        if p is not node:
            cmd += ["--peer-api", f"{p.raft}={p.api}"]
    if node.dns:
        cmd += ["--dns", node.dns]
    for addr in node.consul:
        cmd += ["--consul-http", addr]
    if key_file is not None:
        cmd += ["--cluster-key-file", str(key_file)]
    else:
        cmd += ["--dev"]
    if unsafe_no_fsync:
        cmd += ["--unsafe-no-fsync"]
    return cmd


@click.command()
@click.option("--nodes", type=click.IntRange(1, NODES_MAX), default=3, show_default=True)
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("./regctl-data"),
              show_default=True)
@click.option("--base-port", type=click.IntRange(1024, 65000), default=7000, show_default=True)
@click.option("--dev", is_flag=True, help="No cluster key (INSECURE). By default a key is made in the data dir.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--deaths-max", type=click.IntRange(0, DEATHS_PER_MINUTE_MAX),
              default=RestartPolicy().deaths_per_window_max,
              show_default=True,
              help="A node that dies more often than this within a minute is left down (0: never restart).")
@click.option("--unsafe-no-fsync", is_flag=True,
              help="Never fsync the Raft log (UNSAFE: a power loss can lose acknowledged writes). "
                   "For tests and benchmarks only.")
def up(nodes: int, data_dir: Path, base_port: int, dev: bool, log_format: str, deaths_max: int,
       unsafe_no_fsync: bool) -> None:
    """Start a local cluster in the foreground; Ctrl-C stops it. Data persists in --data-dir.

    A node that dies is restarted after 1s, 2s, 4s, ... (at most 30s) while
    the others keep running; one that dies more than --deaths-max times a
    minute is left down (`regctl status` says so).
    """
    data_dir = data_dir.resolve()
    members = plan(nodes, data_dir, base_port)
    busy = [a for m in members for a in (m.api, m.raft, m.http, m.dns, *m.consul) if not _port_free(a)]
    if _port_free(CONSUL_DEFAULT_ADDR):
        members[0] = dataclasses.replace(members[0], consul=(*members[0].consul, CONSUL_DEFAULT_ADDR))
    if busy:
        raise click.UsageError(f"address(es) already in use: {', '.join(busy)} (another cluster running? "
                               f"use --base-port)")
    key_file = None if dev else ensure_cluster_key(data_dir)
    specs = [NodeSpec(m.node_id, m.api, tuple(node_command(m, members, key_file, log_format, unsafe_no_fsync)),
                      m.data_dir / "node.log") for m in members]
    supervisor = Supervisor(specs, data_dir, RestartPolicy(deaths_per_window_max=deaths_max),
                            lambda line: click.echo(line, err=True))
    signal.signal(signal.SIGINT, supervisor.request_stop)
    signal.signal(signal.SIGTERM, supervisor.request_stop)
    try:
        supervisor.start_all()
        click.echo(f"raft-registry: {nodes} node(s), data in {data_dir}")
        for m in members:
            click.echo(f"  {m.node_id}  api {m.api}  raft {m.raft}  http http://{m.http}  dns {m.dns}  "
                       f"consul {' '.join('http://' + a for a in m.consul)}  log {m.data_dir / 'node.log'}")
        endpoints = [m.api for m in members]
        leader = _wait_ready(endpoints, supervisor)
        if leader:
            click.echo(f"ready: leader {leader}. Try: regctl --endpoints {','.join(endpoints)} status")
        elif not supervisor.stopping:
            click.echo("warning: no leader yet; see the node logs", err=True)
        click.echo("Ctrl-C to stop.")
        supervisor.run()
    finally:
        codes = supervisor.stop_all()
        click.echo("stopped.")
    if supervisor.any_down() or any(code not in (0, -signal.SIGTERM) for code in codes.values()):
        sys.exit(1)


def _wait_ready(endpoints: list[str], supervisor: Supervisor) -> str | None:
    """The leader's id once one is up; supervises meanwhile (a node can die while the cluster starts)."""
    deadline = time.monotonic() + READY_WAIT_S
    with SyncClient(endpoints, timeout_s=1.0, connect_timeout_s=0.3) as client:
        while time.monotonic() < deadline and not supervisor.stopping:
            supervisor.step(time.monotonic())
            try:
                for status in client.cluster_status():
                    if status.get("reachable") and status.get("role") == "leader":
                        return str(status.get("id"))
            except RegistryError:
                pass
            time.sleep(0.2)
    return None
