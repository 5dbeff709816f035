"""``regctl``: the command line of raft-registry.

Every command talks to the cluster through the public client.  Exit codes:
0 success; 1 the cluster refused the request (its error code is printed);
2 bad usage; 3 the cluster could not be reached or did not answer in time.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

import click

from registry.client import SyncClient
from registry.config import NodeConfig, parse_hostport
from registry.errors import InvalidArgument, RegistryError
from registry.failpoints import FAILPOINTS_ENV, Failpoints
from registry.server.dns.settings import DnsSettings, normalize_domain

# The subcommand modules register their commands on ``cli`` when imported.
from . import acl, agent, demo, leases, ops  # noqa: F401
from .base import EXIT_UNAVAILABLE, Ctx, cli, fail, handles_errors
from .durations import Duration, LeaseTtl
from .output import emit, table
from .up import up

# -- server / up ----------------------------------------------------------------


def _with_connection_limits(config: NodeConfig, *, connections_max: int | None,
                            connections_per_source_max: int | None, hello_timeout_ms: float | None,
                            hello_bytes_max: int | None, raft_message_bytes_max: int | None,
                            raft_handshake_bytes_max: int | None, raft_handshake_timeout_ms: float | None,
                            raft_unauthenticated_max: int | None) -> NodeConfig:
    """The client-port and Raft-port limits given on the command line (``validate`` checks them)."""
    client: dict[str, Any] = {
        "connections_max": connections_max,
        "connections_per_source_max": connections_per_source_max,
        "hello_timeout_s": None if hello_timeout_ms is None else hello_timeout_ms / 1000,
        "hello_bytes_max": hello_bytes_max,
    }
    wire: dict[str, Any] = {
        "message_bytes_max": raft_message_bytes_max,
        "handshake_message_bytes_max": raft_handshake_bytes_max,
        "handshake_deadline_s": None if raft_handshake_timeout_ms is None else raft_handshake_timeout_ms / 1000,
        "unauthenticated_connections_max": raft_unauthenticated_max,
    }
    raft_wire = dataclasses.replace(config.raft_wire, **{k: v for k, v in wire.items() if v is not None})
    return config.replace(raft_wire=raft_wire, **{k: v for k, v in client.items() if v is not None})


#: Config fields that a ``server`` flag sets, for errors that name the field (``NodeConfig.validate``).
_FLAG_OF_FIELD = {
    "connections_per_source_max": "--max-client-connections-per-source",
    "connections_max": "--max-client-connections",
    "hello_bytes_max": "--max-hello-bytes",
    "raft_wire.message_bytes_max": "--max-raft-message-bytes",
    "handshake_message_bytes_max": "--max-raft-handshake-bytes",
    "message_bytes_max": "--max-raft-message-bytes",
}


def _name_flags(message: str) -> str:
    """``message`` with each config field a flag sets followed by that flag."""
    for field_name, flag in _FLAG_OF_FIELD.items():
        if message.startswith(field_name + " "):
            return f"{flag}: {message}"
    return message


@cli.command()
@click.option("--id", "node_id", required=True, help="Node id (unique in the cluster).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--raft", "raft_addr", required=True, help="This node's Raft HOST:PORT.")
@click.option("--peers", default="", help="Comma-separated Raft HOST:PORT of the other nodes.")
@click.option("--api", "api_addr", default="127.0.0.1:7001", show_default=True, help="Client API HOST:PORT.")
@click.option("--http", "http_addr", default="127.0.0.1:7201", show_default=True,
              help="HTTP HOST:PORT for /metrics, /healthz, /readyz.")
@click.option("--peer-api", "peer_apis", multiple=True, help="RAFT=API address of a peer, for leader hints.")
@click.option("--cluster-key-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="File holding the Raft cluster key (or env REGCTL_CLUSTER_KEY).")
@click.option("--dev", is_flag=True, help="Run without a cluster key (INSECURE: Raft traffic is unauthenticated).")
@click.option("--unsafe-no-fsync", is_flag=True,
              help="Never fsync the Raft log (UNSAFE: a power loss or kernel crash can lose acknowledged writes "
                   "and break Raft's safety; docs/durability.md). For tests and benchmarks only.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--log-level", default="INFO", show_default=True)
@click.option("--compaction-entries", type=click.IntRange(min=2), default=None,
              help="Snapshot the state and compact the Raft log after this many entries [default: 10000].")
@click.option("--commit-notify-delay-ms", type=click.FloatRange(min=0, max=50, max_open=True), default=None,
              help="How long the leader may hold back a round that only tells followers the new commit index, "
                   "so the next write's round carries it [default: 2; 0 = send at once]. Followers apply "
                   "that much later when writes pause; serial writes send half the Raft messages.")
@click.option("--watch-history-events", type=click.IntRange(min=1), default=None,
              help="Events kept in the watch history for resumes from the past [default: 100000].")
@click.option("--watch-queue-events", type=click.IntRange(min=1), default=None,
              help="Events queued for one watcher before it is resynced [default: 10000].")
@click.option("--max-state-bytes", "state_bytes_max", type=click.IntRange(min=1 << 20), default=None,
              help="Budget of the replicated state in (estimated) bytes; writes past it fail with LIMIT_EXCEEDED "
                   "[default: 2 GiB]. Give every node the same value.")
@click.option("--max-client-connections", "connections_max", type=click.IntRange(min=1), default=None,
              help="Client API connections at once; more are closed at accept [default: 10000].")
@click.option("--max-client-connections-per-source", "connections_per_source_max", type=click.IntRange(min=1),
              default=None, help="Client API connections at once from one address [default: 1024].")
@click.option("--hello-timeout-ms", type=click.FloatRange(min=0, max=60_000, min_open=True), default=None,
              help="A client connection that has not sent its hello this long after connecting is closed "
                   "[default: 5000; at most 60000].")
@click.option("--max-hello-bytes", "hello_bytes_max", type=click.IntRange(min=1024), default=None,
              help="Bytes a client connection may send before its hello [default: 65536; 1 KiB..the frame cap].")
@click.option("--max-raft-message-bytes", "raft_message_bytes_max", type=click.IntRange(min=1), default=None,
              help="Largest Raft message accepted from a peer [default: 268435456 (256 MiB); must exceed the "
                   "largest Raft entry by 1 MiB].")
@click.option("--max-raft-handshake-bytes", "raft_handshake_bytes_max", type=click.IntRange(512, 1 << 20),
              default=None,
              help="Largest Raft frame before a connection has authenticated [default: 4096; 512 B..1 MiB].")
@click.option("--raft-handshake-timeout-ms", type=click.FloatRange(min=0, max=60_000, min_open=True), default=None,
              help="A Raft connection that has not authenticated this long after connecting is closed "
                   "[default: 5000; at most 60000].")
@click.option("--max-raft-unauthenticated-connections", "raft_unauthenticated_max", type=click.IntRange(1, 10_000),
              default=None, help="Raft connections still in their handshake at once; the oldest is closed to "
                                 "make room [default: 64; at most 10000].")
@click.option("--acl", "acl_enabled", is_flag=True,
              help="Enforce ACLs: every request needs a token (bootstrap with `regctl acl bootstrap`).")
@click.option("--tls-cert", "tls_cert", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Serve the client API over TLS with this certificate chain (PEM).")
@click.option("--tls-key", "tls_key", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Private key of --tls-cert (PEM).")
@click.option("--tls-client-ca", "tls_client_ca", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Require client certificates signed by this CA.")
@click.option("--http-tls-cert", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Serve the HTTP endpoints (--http) over TLS with this certificate chain (PEM): they take "
                   "Bearer tokens.")
@click.option("--http-tls-key", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Private key of --http-tls-cert (PEM).")
@click.option("--dns", "dns_addr", default=None,
              help="Answer DNS for services (A, AAAA, SRV) on this HOST:PORT, UDP and TCP (docs/dns.md).")
@click.option("--dns-domain", default="consul.", show_default=True, help="The DNS domain answered for.")
@click.option("--dns-ttl", "dns_ttl_s", type=click.IntRange(0, 86_400), default=0, show_default=True,
              help="TTL of DNS answers, in seconds.")
@click.option("--dns-token-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With --acl: file holding the token whose read rights DNS answers with (or env REGCTL_DNS_TOKEN; "
                   "without one DNS is off).")
@click.option("--consul-http", "consul_http_addrs", multiple=True,
              help="Serve Consul's HTTP API (catalog, health, agent, KV, blocking queries) on this HOST:PORT, "
                   "for Prometheus, Traefik and Consul clients (docs/consul.md); repeat for more listeners.")
@click.option("--consul-http-tls-cert", "consul_tls_cert", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Serve Consul's HTTP API (--consul-http) over TLS with this certificate chain "
                                 "(PEM): it takes tokens.")
@click.option("--consul-http-tls-key", "consul_tls_key", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Private key of --consul-http-tls-cert (PEM).")
def server(node_id: str, data_dir: Path, raft_addr: str, peers: str, api_addr: str, http_addr: str,
           peer_apis: tuple[str, ...], cluster_key_file: Path | None, dev: bool, log_format: str,
           log_level: str, compaction_entries: int | None, commit_notify_delay_ms: float | None,
           watch_history_events: int | None,
           watch_queue_events: int | None, acl_enabled: bool, tls_cert: Path | None, tls_key: Path | None,
           tls_client_ca: Path | None, dns_addr: str | None, dns_domain: str, dns_ttl_s: int,
           dns_token_file: Path | None, consul_http_addrs: tuple[str, ...], unsafe_no_fsync: bool,
           state_bytes_max: int | None, http_tls_cert: Path | None, http_tls_key: Path | None,
           consul_tls_cert: Path | None, consul_tls_key: Path | None, **limit_flags: Any) -> None:
    """Run one registry node in the foreground."""
    from registry.raft.incarnation import load_or_create
    from registry.server.node import consul_ssl_context, http_ssl_context, run_node, server_ssl_context

    key: str | None = None
    if cluster_key_file is not None:
        try:
            key = cluster_key_file.read_text().strip()
        except OSError as err:
            raise click.UsageError(f"cannot read cluster key file: {err}") from None
    elif os.environ.get("REGCTL_CLUSTER_KEY"):
        key = os.environ["REGCTL_CLUSTER_KEY"].strip()
    try:
        api_host, api_port = parse_hostport(api_addr, what="--api")
        http_host, http_port = parse_hostport(http_addr, what="--http")
        peer_list = tuple(p.strip() for p in peers.split(",") if p.strip() and p.strip() != raft_addr)
        pairs = []
        for item in peer_apis:
            raft, sep, api = item.partition("=")
            if not sep:
                raise click.UsageError(f"--peer-api must be RAFT=API, got {item!r}")
            pairs.append((raft, api))
        config = NodeConfig(
            node_id=node_id, data_dir=data_dir, raft_addr=raft_addr, peers=peer_list,
            api_host=api_host, api_port=api_port, http_host=http_host, http_port=http_port,
            peer_apis=tuple(pairs), cluster_key=key, dev=dev, log_format=log_format, log_level=log_level.upper(),
            acl=acl_enabled, tls_cert=tls_cert, tls_key=tls_key, tls_client_ca=tls_client_ca,
            failpoints=Failpoints.parse(os.environ.get(FAILPOINTS_ENV, "")), unsafe_no_fsync=unsafe_no_fsync,
        )
        timing = config.raft
        if compaction_entries is not None:
            timing = dataclasses.replace(timing, compaction_entries=compaction_entries)
        if commit_notify_delay_ms is not None:
            timing = dataclasses.replace(timing, commit_notify_delay_s=commit_notify_delay_ms / 1000)
        config = config.replace(raft=timing)
        limits = config.watch_limits
        if watch_history_events is not None:
            limits = dataclasses.replace(limits, history_events_max=watch_history_events)
        if watch_queue_events is not None:
            limits = dataclasses.replace(limits, queue_events_max=watch_queue_events)
        config = config.replace(watch_limits=limits, dns=_dns_settings(dns_addr, dns_domain, dns_ttl_s, dns_token_file))
        if state_bytes_max is not None:
            config = config.replace(state_bytes_max=state_bytes_max)
        config = _with_connection_limits(config, **limit_flags)
        config = config.replace(http_tls_cert=http_tls_cert, http_tls_key=http_tls_key,
                                consul_tls_cert=consul_tls_cert, consul_tls_key=consul_tls_key)
        if consul_http_addrs:
            config = config.replace(consul_http=tuple(parse_hostport(a, what="--consul-http")
                                                      for a in consul_http_addrs))
        config.validate()
    except RegistryError as err:
        raise click.UsageError(_name_flags(err.message)) from None
    try:
        server_ssl_context(config)  # load once here: a bad file is a usage error, not a traceback at bind time
    except OSError as err:  # a missing file, or ssl.SSLError (an OSError) for a bad PEM
        raise click.UsageError(f"cannot load TLS files (--tls-cert/--tls-key/--tls-client-ca): {err}") from None
    try:
        http_ssl_context(config)
    except OSError as err:
        raise click.UsageError(f"cannot load TLS files (--http-tls-cert/--http-tls-key): {err}") from None
    try:
        consul_ssl_context(config)
    except OSError as err:
        raise click.UsageError(f"cannot load TLS files (--consul-http-tls-cert/--consul-http-tls-key): {err}") from None
    try:
        # The data directory's identity (made on first use); a corrupt one is a usage error, not a traceback.
        load_or_create(Path(config.data_dir))
    except (InvalidArgument, OSError) as err:
        raise click.UsageError(str(err)) from None
    run_node(config)


#: The DNS token from the environment when there is no --dns-token-file.
DNS_TOKEN_ENV = "REGCTL_DNS_TOKEN"


def _dns_settings(addr: str | None, domain: str, ttl_s: int, token_file: Path | None) -> DnsSettings | None:
    if addr is None:
        if token_file is not None:
            raise click.UsageError("--dns-token-file needs --dns")
        return None
    host, port = parse_hostport(addr, what="--dns")
    token: str | None = None
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as err:
            raise click.UsageError(f"cannot read --dns-token-file: {err}") from None
    elif os.environ.get(DNS_TOKEN_ENV, "").strip():
        # For containers, like REGCTL_CLUSTER_KEY: docker-compose passes it from .env (empty: DNS off with --acl).
        token = os.environ[DNS_TOKEN_ENV].strip()
    return DnsSettings(host=host, port=port, domain=normalize_domain(domain), ttl_s=ttl_s, token=token)


cli.add_command(up)


# -- status ----------------------------------------------------------------------

STATUS_KEYS = ("id", "role", "term", "commit_index", "applied_index", "revision", "api", "reachable", "pid")
#: How often `status --wait` asks again.
STATUS_WAIT_INTERVAL_S = 0.5


@cli.command()
@click.option("--watch", "watch_live", is_flag=True, help="Refresh every second (same as `regctl top`).")
@click.option("--wait", "wait_ms", type=Duration(), default=None,
              help="Block until the cluster is ready (e.g. 30s); exit 3 if it is not by then.")
@click.option("--data-dir", "up_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("./regctl-data"), show_default=True,
              help="Data dir of a running `regctl up`: shows which nodes it restarts or left down.")
@click.pass_obj
@handles_errors
def status(obj: Ctx, watch_live: bool, wait_ms: int | None, up_dir: Path) -> None:
    """Every node: role, term, commit and applied index, revision, PID.

    Exits 0 only when the cluster is ready: a majority of the endpoints
    answer and agree on a leader. Otherwise it prints the table and exits 3.
    """
    import time

    from .readiness import readiness
    from .supervisor import read_state

    if watch_live:
        from .ops import top

        click.get_current_context().invoke(top)
        return
    deadline = time.monotonic() + (wait_ms or 0) / 1000
    with SyncClient(obj.endpoints, token=obj.token, timeout_s=obj.timeout_s, connect_timeout_s=0.5,
                    ssl_context=obj.ssl_context()) as client:
        while True:
            nodes = client.cluster_status()
            ready = readiness(nodes)
            if ready.ready or time.monotonic() >= deadline:
                break
            time.sleep(min(STATUS_WAIT_INTERVAL_S, max(0.0, deadline - time.monotonic())))
    supervised = read_state(up_dir.resolve())
    data: list[dict[str, Any]] = [
        {k: n.get(k) for k in (*STATUS_KEYS, "leader", "incarnation", "incarnation_recorded", "build", "error")}
        for n in nodes]
    for n in data:
        up_node = supervised.get(str(n["api"]))
        if up_node is not None:
            n["supervisor"] = up_node
            if n["pid"] is None:
                n["pid"] = up_node.get("pid")
    rows = [[n.get(k) if n.get("reachable") or k in ("api", "reachable", "pid") else "-" for k in STATUS_KEYS]
            for n in data]
    notes = [f"{n['supervisor']['id']} ({n['api']}) left down by regctl up: {n['supervisor']['note']}; "
             f"log: {n['supervisor']['log']}" for n in data if n.get("supervisor", {}).get("state") == "down"]
    notes += [f"{n['supervisor']['id']} ({n['api']}) is being restarted by regctl up: {n['supervisor']['note']}"
              for n in data if n.get("supervisor", {}).get("state") == "restarting"]
    emit(obj.output, data, "\n".join([table(rows, [k.upper() for k in STATUS_KEYS]), *notes]))
    for n in data:
        if not n.get("reachable") and n.get("error"):
            click.echo(f"{n['api']}: {n['error']}", err=True)
    if not ready.ready:
        click.echo(f"not ready: {ready.reason}", err=True)
        sys.exit(EXIT_UNAVAILABLE)


# -- service ---------------------------------------------------------------------


@cli.group()
def service() -> None:
    """Register, deregister, list and read services."""


def _parse_meta(items: tuple[str, ...]) -> dict[str, str]:
    meta: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.UsageError(f"--meta must be KEY=VALUE, got {item!r}")
        meta[key] = value
    return meta


@service.command("register")
@click.argument("name")
@click.option("--address", required=True, help="HOST:PORT of the instance.")
@click.option("--id", "instance_id", default=None, help="Instance id (default NAME-HOST-PORT).")
@click.option("--meta", multiple=True, help="KEY=VALUE metadata, repeatable.")
@click.option("--tag", "tags", multiple=True, help="Tag, repeatable.")
@click.option("--weight", type=int, default=1, show_default=True)
@click.option("--ttl", type=LeaseTtl(), default=None,
              help="Attach the instance to a new lease of this TTL (e.g. 10s): it goes when the lease does.")
@click.option("--keepalive", is_flag=True,
              help="With --ttl: stay in the foreground renewing the lease; deregister on Ctrl-C.")
@click.pass_obj
@handles_errors
def service_register(obj: Ctx, name: str, address: str, instance_id: str | None, meta: tuple[str, ...],
                     tags: tuple[str, ...], weight: int, ttl: int | None, keepalive: bool) -> None:
    """Register an instance of service NAME."""
    from .leases import Stopper, keep_alive

    try:
        host, port = parse_hostport(address, what="--address")
    except RegistryError as err:
        raise click.UsageError(err.message) from None
    if keepalive and ttl is None:
        raise click.UsageError("--keepalive needs --ttl")
    instance_id = instance_id or f"{name}-{host}-{port}"
    stopper = Stopper() if keepalive else None
    with obj.client() as client:
        lease_id = client.lease_grant(ttl) if ttl is not None else None
        result = client.register(name, instance_id, host, port, meta=_parse_meta(meta), tags=tags, weight=weight,
                                 lease=lease_id)
        emit(obj.output, {"service": name, "id": instance_id, "lease": lease_id, **result},
             f"registered {name}/{instance_id} at revision {result['revision']}"
             + (f" on lease {lease_id} (ttl {(ttl or 0) / 1000:g}s)" if lease_id is not None else ""))
        if stopper is None or lease_id is None or ttl is None:
            return
        click.echo("keeping it alive; Ctrl-C to deregister", err=True)
        lost = keep_alive(client, lease_id, ttl, stopper)
        if lost is not None:
            fail(lost)
        client.lease_revoke(lease_id)
        click.echo(f"deregistered {name}/{instance_id}", err=True)


@service.command("deregister")
@click.argument("name")
@click.argument("instance_id")
@click.pass_obj
@handles_errors
def service_deregister(obj: Ctx, name: str, instance_id: str) -> None:
    """Remove instance INSTANCE_ID of service NAME."""
    with obj.client() as client:
        result = client.deregister(name, instance_id)
    emit(obj.output, {"service": name, "id": instance_id, **result},
         f"deregistered {name}/{instance_id} at revision {result['revision']}")


@service.command("status")
@click.argument("name")
@click.argument("instance_id")
@click.argument("status")
@click.option("--note", default="", help="Check output to carry in the status event (at most 1024 characters).")
@click.pass_obj
@handles_errors
def service_status(obj: Ctx, name: str, instance_id: str, status: str, note: str) -> None:
    """Set the health of instance INSTANCE_ID of NAME: passing, warning or critical.

    This is the owner's check-in (what the agent's checks do for you). Reporting
    the status an instance already has changes nothing and keeps the revision.
    """
    with obj.client() as client:
        result = client.set_status(name, instance_id, status, note)
    what = "set" if result.get("changed") else "unchanged"
    emit(obj.output, {"service": name, "id": instance_id, "status": status, **result},
         f"{name}/{instance_id} {status} ({what}) at revision {result['revision']}")


CONSISTENCY = click.Choice(["linearizable", "stale"])


@service.command("list")
@click.option("--consistency", type=CONSISTENCY, default="linearizable", show_default=True)
@click.pass_obj
@handles_errors
def service_list(obj: Ctx, consistency: str) -> None:
    """All services with instance counts."""
    with obj.client() as client:
        revision, services = client.list_services(consistency=consistency)
    # TAGS: the service's own tags and every tag of its instances.
    rows = [[s["name"], s["instances"], s["passing"],
             ",".join(sorted({*s.get("tags", []), *s.get("instance_tags", [])}))] for s in services]
    emit(obj.output, {"revision": revision, "services": services},
         table(rows, ["NAME", "INSTANCES", "PASSING", "TAGS"]) + f"\nrevision: {revision}")


@service.command("get")
@click.argument("name")
@click.option("--consistency", type=CONSISTENCY, default="linearizable", show_default=True)
@click.option("--min-revision", type=int, default=None, help="Wait until the node has applied this revision.")
@click.pass_obj
@handles_errors
def service_get(obj: Ctx, name: str, consistency: str, min_revision: int | None) -> None:
    """One service and its instances."""
    with obj.client() as client:
        revision, body = client.get_service(name, consistency=consistency, min_revision=min_revision)
    rows = [
        [i["id"], i["address"], i["port"], i["status"], i["weight"], ",".join(i.get("tags", [])),
         ",".join(f"{k}={v}" for k, v in sorted(i.get("meta", {}).items())),
         # The note of the last status change (check output); last, as it may hold spaces.
         " ".join(i.get("note", "").split())]
        for i in body["instances"]
    ]
    emit(obj.output, {"revision": revision, **body},
         table(rows, ["ID", "ADDRESS", "PORT", "STATUS", "WEIGHT", "TAGS", "META", "NOTE"])
         + f"\nrevision: {revision}")




def main() -> None:
    cli(prog_name="regctl")


if __name__ == "__main__":
    main()
