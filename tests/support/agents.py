"""Agent processes, echo backends and a traffic thread for the agent's integration tests.

Everything runs on 127.0.0.1.  ``Fleet.close()`` kills whatever is left;
the tests call it in a ``finally`` (through a fixture), pass or fail.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from registry.client import SyncClient
from registry.errors import NotFound
from registry.server.ports import free_ports
from tests.support.cluster import regctl_executable, wait_until


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass
class Proc:
    name: str
    cmd: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def terminate(self, timeout_s: float = 10.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def backend(root: Path, name: str, port: int) -> Proc:
    return Proc(name, [sys.executable, "-m", "registry.agent.echo", "--name", name, "--port", str(port)],
                root / f"{name}.log")


def agent(root: Path, name: str, endpoints: list[str], *args: str) -> Proc:
    return Proc(name, [regctl_executable(), "--endpoints", ",".join(endpoints), "agent", *args],
                root / f"{name}.log")


def get_json(port: int, path: str = "/healthz") -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
        return json.loads(response.read())


def get_text(port: int, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
        return str(response.read().decode())


def upstream_view(http_port: int) -> dict[str, Any]:
    """The client agent's only upstream as /healthz shows it."""
    view: dict[str, Any] = get_json(http_port)["upstreams"][0]
    return view


def endpoint_states(http_port: int) -> dict[str, str]:
    return {e["id"]: e["status"] for e in upstream_view(http_port)["endpoints"]}


def ask(port: int, text: str = "hello", timeout_s: float = 3.0) -> str:
    """One connection through ``port``: send a line, return the answering instance's name."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(text.encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"closed after {data!r}")
            data += chunk
    return data.split(b" ", 1)[0].decode()


def read_access_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class Result:
    started: float  # time.time()
    instance: str | None
    error: str | None = None


class Traffic(threading.Thread):
    """Steady connections through a proxy port, one request each, recorded with wall-clock start times."""

    def __init__(self, port: int, pause_s: float = 0.005) -> None:
        super().__init__(name=f"traffic-{port}", daemon=True)
        self.port = port
        self.pause_s = pause_s
        self.results: list[Result] = []
        self._halt = threading.Event()

    def run(self) -> None:
        n = 0
        while not self._halt.is_set():
            n += 1
            started = time.time()
            try:
                self.results.append(Result(started, ask(self.port, f"req-{n}")))
            except OSError as err:
                self.results.append(Result(started, None, repr(err)))
            self._halt.wait(self.pause_s)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)

    def since(self, t: float) -> list[Result]:
        return [r for r in list(self.results) if r.started >= t]

    def failures(self, since: float = 0.0) -> list[Result]:
        return [r for r in self.since(since) if r.error is not None]

    def served(self, since: float = 0.0) -> Counter[str]:
        return Counter(r.instance for r in self.since(since) if r.instance is not None)

    def wait_served(self, count: int, since: float, deadline_s: float = 10.0) -> None:
        """Wait until ``count`` requests started after ``since`` were served (a traffic window, not a sleep)."""
        end = time.monotonic() + deadline_s
        while sum(self.served(since).values()) < count:
            assert time.monotonic() < end, f"traffic: fewer than {count} requests served in {deadline_s}s"
            time.sleep(0.02)


def _service_exists(client: SyncClient, name: str) -> bool:
    try:
        client.get_service(name)
    except NotFound:
        return False
    return True


@dataclass
class Fleet:
    """Echo backends, each with an agent, and client agents, all against one cluster."""

    root: Path
    endpoints: list[str]
    ttl: str = "2s"
    backends: dict[str, Proc] = field(default_factory=dict)
    agents: dict[str, Proc] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    http_ports: dict[str, int] = field(default_factory=dict)

    def add_instance(self, name: str, weight: int = 1) -> None:
        port, http = free_ports(2)
        self.ports[name] = port
        self.http_ports[name] = http
        self.backends[name] = backend(self.root, name, port).start()
        self.agents[f"agent-{name}"] = agent(
            self.root, f"agent-{name}", self.endpoints, "--service", "echo", "--id", name, "--address",
            f"127.0.0.1:{port}", "--weight", str(weight), "--ttl", self.ttl, "--check", f"tcp:127.0.0.1:{port}",
            "--check-interval", "200ms", "--check-timeout", "150ms", "--rise", "2", "--fall", "2",
            "--http", f"127.0.0.1:{http}",
        ).start()

    def restart_backend(self, name: str) -> None:
        self.backends[name] = backend(self.root, name, self.ports[name]).start()

    def add_client(self, name: str, upstream: str = "echo", policy: str = "round_robin") -> tuple[int, int]:
        """A client agent proxying ``upstream``; returns (proxy port, http port).

        Waits until the upstream service exists first: an agent refuses to start
        with an upstream the registry has never heard of.
        """
        with SyncClient(self.endpoints) as client:
            wait_until(lambda: _service_exists(client, upstream), 30, f"service {upstream} to exist")
        port, http = free_ports(2)
        self.ports[name] = port
        self.http_ports[name] = http
        self.agents[name] = agent(
            self.root, name, self.endpoints, "--name", name, "--upstream", f"{upstream}={port}:{policy}",
            "--http", f"127.0.0.1:{http}", "--access-log", str(self.access_log(name)), "--seed", "1",
        ).start()
        return port, http

    def access_log(self, client: str) -> Path:
        return self.root / f"{client}.access.log"

    def wait_healthy(self, client: str, healthy: int, total: int | None = None, deadline_s: float = 30.0) -> None:
        http = self.http_ports[client]

        def ok() -> bool:
            view = upstream_view(http)
            return bool(view["healthy"] == healthy and (total is None or view["total"] == total))

        wait_until(ok, deadline_s, f"{client} to see {healthy} healthy endpoint(s)")

    def close(self) -> None:
        for proc in [*self.agents.values(), *self.backends.values()]:
            proc.kill()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.log()[-3000:]}" for p in [*self.agents.values(),
                                                                         *self.backends.values()])
