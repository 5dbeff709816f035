"""``regctl demo``: the whole agent idea in one command, on 127.0.0.1 only.

Starts a three-node cluster, three instances of a small echo service (each
with its own agent that registers it, checks it and keeps its lease alive)
and a client agent that proxies the echo service on a local port.  Sends
steady traffic through that port, kills one instance with ``kill -9``,
later starts it again, and prints per-instance request counts and the
agent's rerouted connect failures for each phase.  Cleans up every process
and the temporary data directory, also on error and on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from registry.client import SyncClient
from registry.errors import RegistryError
from registry.server.ports import ports_free

from .base import cli
from .output import table
from .up import ensure_cluster_key, node_command, plan

#: Demo ports: a random base in this range (away from regctl up's 7000s, the tests' 20000-40000,
#: the benchmark's 41000-60000, and below Linux's ephemeral ports).
PORT_RANGE = (10_000, 19_000)
INSTANCES = 3
#: Client connections in flight during the traffic phases, and the pause between two of one worker.
WORKERS = 4
PAUSE_S = 0.02
STARTUP_WAIT_S = 30.0


@dataclass
class _Procs:
    nodes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    backends: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    agents: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def stop(self) -> None:
        # Agents first, while the cluster is up, so they deregister; then the rest.
        for group in (self.agents, list(self.backends.values()), self.nodes):
            for proc in group:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 5.0
            for proc in group:
                try:
                    proc.wait(timeout=max(0.05, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _base_port() -> int:
    for _ in range(100):
        base = random.randrange(PORT_RANGE[0], PORT_RANGE[1], 10)
        # The nodes take 0-400 (regctl up's plan: API, Raft, HTTP, Consul HTTP, DNS); the echo
        # instances 500, the agents 600.
        offsets = [o + i for o in (0, 100, 200, 300, 400, 500, 600) for i in range(8)]
        if ports_free(base + o for o in offsets):
            return base
    raise click.ClickException("no free loopback port range for the demo")


def _spawn(cmd: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _get_json(url: str) -> Any:
    import urllib.request

    with urllib.request.urlopen(url, timeout=2) as response:
        return json.loads(response.read())


def _connect_failures(metrics_url: str) -> Counter[str]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url, timeout=2) as response:
        text = response.read().decode()
    out: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        if family.name == "regctl_agent_upstream_connect_failures":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    out[sample.labels["endpoint"]] += int(sample.value)
    return out


async def _traffic(port: int, seconds: float) -> tuple[Counter[str], int]:
    """Connections through the proxy for ``seconds``: served count by instance, failed count."""
    import asyncio

    served: Counter[str] = Counter()
    failed = 0
    end = time.monotonic() + seconds

    async def worker(n: int) -> None:
        nonlocal failed
        i = 0
        while time.monotonic() < end:
            i += 1
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
                writer.write(f"hello {n}-{i}\n".encode())
                line = await asyncio.wait_for(reader.readline(), 2)
                writer.close()
                if not line:
                    raise ConnectionError("empty answer")
                served[line.split(b" ", 1)[0].decode()] += 1
            except (OSError, TimeoutError):
                failed += 1
            await asyncio.sleep(PAUSE_S)

    await asyncio.gather(*(worker(n) for n in range(WORKERS)))
    return served, failed


def _wait(cond: Any, what: str, deadline_s: float = STARTUP_WAIT_S) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        with contextlib.suppress(OSError, RegistryError, ValueError, KeyError):
            if cond():
                return
        time.sleep(0.2)
    raise click.ClickException(f"timed out waiting for {what}")


@cli.command()
@click.option("--phase", "phase_s", type=click.FloatRange(1, 60), default=4.0, show_default=True,
              help="Seconds of traffic per phase.")
@click.option("--keep", is_flag=True, help="Keep the temporary directory (logs, access log) afterwards.")
def demo(phase_s: float, keep: bool) -> None:
    """Cluster + 3 echo instances with agents + a client agent; kill one instance under traffic."""
    root = Path(tempfile.mkdtemp(prefix="regctl-demo-"))
    procs = _Procs()
    try:
        _run(root, procs, phase_s)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
    finally:
        click.echo("cleaning up: stopping agents, instances and nodes ...")
        procs.stop()
        if keep:
            click.echo(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
        click.echo("done.")


def _run(root: Path, procs: _Procs, phase_s: float) -> None:
    import asyncio

    base = _base_port()
    members = plan(3, root, base)
    key_file = ensure_cluster_key(root)
    for m in members:
        m.data_dir.mkdir(parents=True, exist_ok=True)
        procs.nodes.append(_spawn(node_command(m, members, key_file, "text"), m.data_dir / "node.log"))
    endpoints = ",".join(m.api for m in members)
    click.echo(f"cluster: 3 nodes on {endpoints} (logs in {root})")

    def leader() -> bool:
        with SyncClient([m.api for m in members], timeout_s=1.0, connect_timeout_s=0.3) as client:
            client.list_services()
            return True

    _wait(leader, "a leader")
    python = sys.executable
    regctl = [python, "-m", "cli", "--endpoints", endpoints]
    echo_ports = {f"echo-{i}": base + 500 + i for i in range(1, INSTANCES + 1)}

    def start_backend(name: str) -> None:
        procs.backends[name] = _spawn([python, "-m", "registry.agent.echo", "--name", name, "--port",
                                       str(echo_ports[name])], root / f"{name}.log")

    for i, (name, port) in enumerate(echo_ports.items(), start=1):
        start_backend(name)
        procs.agents.append(_spawn([*regctl, "agent", "--service", "echo", "--id", name, "--address",
                                    f"127.0.0.1:{port}", "--ttl", "3s", "--check", f"tcp:127.0.0.1:{port}",
                                    "--check-interval", "300ms", "--check-timeout", "200ms", "--rise", "2",
                                    "--fall", "2", "--http", f"127.0.0.1:{base + 600 + i}"],
                                   root / f"agent-{name}.log"))
    def registered() -> bool:
        with SyncClient([m.api for m in members], timeout_s=1.0, connect_timeout_s=0.3) as client:
            return bool(client.get_service("echo")[1]["instances"])

    # The client agent refuses an upstream the registry has never heard of.
    _wait(registered, "the echo service to be registered")
    proxy_port, client_http = base + 600, f"127.0.0.1:{base + 607}"
    procs.agents.append(_spawn([*regctl, "agent", "--name", "demo-client", "--upstream",
                                f"echo={proxy_port}:round_robin", "--http", client_http, "--access-log",
                                str(root / "access.log")], root / "agent-client.log"))
    click.echo(f"3 echo instances on ports {', '.join(str(p) for p in echo_ports.values())}, each with an agent "
               "(tcp check every 300ms, fall 2, lease ttl 3s)")
    click.echo(f"client agent: echo proxied on 127.0.0.1:{proxy_port} (round_robin); "
               f"http://{client_http}/healthz, /metrics; access log {root / 'access.log'}")

    def healthy(n: int) -> bool:
        ups = _get_json(f"http://{client_http}/healthz")["upstreams"][0]
        return bool(ups["healthy"] == n and ups["total"] == INSTANCES)

    _wait(lambda: healthy(INSTANCES), "the client agent to see 3 healthy instances")
    metrics_url = f"http://{client_http}/metrics"

    def phase(title: str) -> None:
        before = _connect_failures(metrics_url)
        click.echo(f"\n{title}: {phase_s:g}s of steady traffic ({WORKERS} clients, one connection per request)")
        served, failed = asyncio.run(_traffic(proxy_port, phase_s))
        failures = _connect_failures(metrics_url) - before
        rows = [[name, served.get(name, 0), failures.get(name, 0)] for name in echo_ports]
        click.echo(table(rows, ["INSTANCE", "REQUESTS SERVED", "CONNECT FAILURES (rerouted by the agent)"]))
        click.echo(f"client connections: {sum(served.values()) + failed}, failed: {failed}")

    phase("phase 1, all healthy")
    victim = "echo-2"
    proc = procs.backends[victim]
    proc.kill()
    proc.wait()
    click.echo(f"\nkill -9 {victim} (pid {proc.pid}); its agent's check will mark it critical, "
               "the client agent ejects it on the first failed connects")
    phase(f"phase 2, {victim} dead")
    view = _get_json(f"http://{client_http}/healthz")["upstreams"][0]
    states = ", ".join(f"{e['id']} {e['status']}" + (" (ejected)" if e["ejected_s"] else "")
                       for e in view["endpoints"])
    click.echo(f"client agent's table: {states}")
    start_backend(victim)
    click.echo(f"\nrestarted {victim}; after 2 good checks it is passing again")
    _wait(lambda: healthy(INSTANCES), f"{victim} back in rotation")
    phase(f"phase 3, {victim} back")
