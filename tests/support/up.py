"""``regctl up`` as a real subprocess for integration tests, with cleanup that reaches its nodes.

The nodes run in sessions of their own and ``up`` restarts them with new
PIDs, so cleanup finds them by their command line: every node of a run names
the run's data directory, a fresh temporary path no other process uses.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
from pathlib import Path

from registry.server.ports import ports_free
from tests.support.cluster import regctl_executable

#: regctl up's ports per node (cli/up.py plan): API, Raft, HTTP, Consul HTTP, DNS; it refuses to start if any is taken.
UP_PORT_OFFSETS = (0, 100, 200, 300, 400)


def up_ports_free(base: int, nodes: int = 3) -> bool:
    return ports_free(base + off + i for i in range(1, nodes + 1) for off in UP_PORT_OFFSETS)


def free_up_base_port(nodes: int = 3) -> int:
    for _ in range(100):
        # Below the ephemeral range (32768+), away from the test clusters (20000-32700).
        base = random.randrange(10_000, 19_500, 10)
        if up_ports_free(base, nodes):
            return base
    raise RuntimeError("no free port range for regctl up")


def cmdline(pid: int) -> list[str]:
    """The command line of a live (not zombie) process, or [] when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    if stat.rsplit(")", 1)[1].split()[0] == "Z":
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def pids_naming(marker: str) -> set[int]:
    """Live processes whose command line mentions ``marker``."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            if any(marker in part for part in cmdline(int(entry.name))):
                found.add(int(entry.name))
    return found


class UpRun:
    """One ``regctl up`` process with its output in ``log``."""

    def __init__(self, data_dir: Path, base_port: int, log: Path, *extra: str, nodes: int = 3) -> None:
        self.data_dir = data_dir
        self.log = log
        self.endpoints = [f"127.0.0.1:{base_port + i}" for i in range(1, nodes + 1)]
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [regctl_executable(), "up", "--nodes", str(nodes), "--base-port", str(base_port),
                 "--data-dir", str(data_dir), *extra],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def node_pids(self) -> set[int]:
        return {pid for pid in pids_naming(str(self.data_dir)) if pid != self.proc.pid}

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for pid in self.node_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
