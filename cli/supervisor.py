"""The process side of ``regctl up``: start the nodes, restart those that die, stop them all.

Theory of operation
-------------------
One loop in the foreground process polls its children every
``POLL_INTERVAL_S``.  A node that exited while ``up`` was not stopping is a
death: it is logged with the node's log path, and ``restart_policy.decide``
says when to start it again or that it stays down.  The other nodes are
never touched, so the cluster keeps its majority and elects a new leader on
its own.

What the supervisor knows is written to ``<data-dir>/up.json`` (atomically,
on every change) so that ``regctl status`` can show each node's PID and say
when a node was left down; the file names the supervisor's own PID, and a
reader ignores a file whose supervisor is gone.

SIGINT/SIGTERM only set a flag; the loop then sends SIGTERM to every node,
waits ``STOP_GRACE_S`` and kills what is left.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .restart_policy import RestartPolicy, decide

__all__ = [
    "STATE_FILE",
    "NodeSpec",
    "Supervisor",
    "read_state",
    "regctl_argv",
]

#: How long the nodes get to stop on SIGTERM before SIGKILL (a node stops in well under a second).
STOP_GRACE_S = 5.0
#: How often the supervisor looks at its children; a death is noticed within this.
POLL_INTERVAL_S = 0.1
#: The supervisor's state, in the data dir (read by ``regctl status``).
STATE_FILE = "up.json"


@dataclass(frozen=True)
class NodeSpec:
    node_id: str
    api: str
    argv: tuple[str, ...]
    log_path: Path


@dataclass
class _Child:
    spec: NodeSpec
    proc: subprocess.Popen[bytes] | None = None
    #: Monotonic times of the deaths still inside the policy's window.
    deaths: tuple[float, ...] = ()
    #: Monotonic time of the pending restart, or None.
    restart_at: float | None = None
    #: "running", "restarting" (waiting out a backoff) or "down" (given up on).
    state: str = "running"
    last_exit: int | None = None
    starts: int = 0
    note: str = field(default="")


def regctl_argv() -> list[str]:
    """How to start ``regctl``, so that a node shows as ``regctl server`` in ``ps``.

    The installed console script (its command line reads ``.../python
    .../bin/regctl server ...``); without one (running from a checkout that
    was never installed), ``python -m cli``, which ``ps`` shows as such.
    """
    candidates = [Path(sys.executable).parent / "regctl"]
    found = shutil.which("regctl")
    if found is not None:
        candidates.append(Path(found))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return [str(path)]
    return [sys.executable, "-m", "cli"]


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_state(data_dir: Path) -> dict[str, dict[str, Any]]:
    """The nodes of a running ``regctl up`` in ``data_dir``, by API address; {} when none runs there."""
    try:
        state = json.loads((data_dir / STATE_FILE).read_text())
        if not isinstance(state, dict) or not _pid_alive(int(state["pid"])):
            return {}
        return {str(n["api"]): n for n in state["nodes"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


class Supervisor:
    def __init__(self, specs: Sequence[NodeSpec], data_dir: Path, policy: RestartPolicy,
                 echo: Callable[[str], None], env: dict[str, str] | None = None) -> None:
        policy.validate()
        self._children = [_Child(spec) for spec in specs]
        self._data_dir = data_dir
        self._policy = policy
        self._echo = echo
        self._env = env
        self.stopping = False

    def request_stop(self, signum: int = 0, frame: object = None) -> None:
        """A signal handler: the loop notices and stops the nodes."""
        self.stopping = True

    def start_all(self) -> None:
        for child in self._children:
            self._start(child)
        self._write_state()

    def _start(self, child: _Child) -> None:
        child.spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(child.spec.log_path, "ab") as log:
            # A session of its own: the terminal's Ctrl-C reaches up only, which stops the nodes in order.
            child.proc = subprocess.Popen(list(child.spec.argv), stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True, env=self._env)
        child.state = "running"
        child.restart_at = None
        child.starts += 1

    def any_down(self) -> bool:
        return any(c.state == "down" for c in self._children)

    def step(self, now: float) -> None:
        """Notice deaths and due restarts (one poll)."""
        changed = False
        for child in self._children:
            proc = child.proc
            if child.state == "running" and proc is not None and proc.poll() is not None:
                changed = True
                child.last_exit = proc.returncode
                decision = decide(self._policy, (*child.deaths, now), now)
                child.deaths = decision.recent
                what = (f"node {child.spec.node_id} {_describe_exit(proc.returncode)} "
                        f"(log: {child.spec.log_path})")
                if decision.restart:
                    child.state = "restarting"
                    child.restart_at = now + decision.delay_s
                    child.note = f"restarting in {decision.delay_s:g}s"
                    self._echo(f"{what}; restarting it in {decision.delay_s:g}s")
                else:
                    child.state = "down"
                    child.note = (f"left down: died {len(decision.recent)} times within "
                                  f"{self._policy.window_s:g}s")
                    self._echo(f"{what}; it died {len(decision.recent)} times within {self._policy.window_s:g}s, "
                               f"more than {self._policy.deaths_per_window_max}: leaving it down "
                               f"(restart `regctl up` after reading its log)")
            elif child.state == "restarting" and child.restart_at is not None and now >= child.restart_at:
                changed = True
                self._start(child)
                child.note = f"restarted after {len(child.deaths)} recent death(s)"
                self._echo(f"node {child.spec.node_id} restarted (pid {child.proc.pid if child.proc else '?'})")
        if changed:
            self._write_state()

    def run(self, sleep: Callable[[float], None] = time.sleep) -> None:
        """Supervise until ``request_stop``."""
        while not self.stopping:
            self.step(time.monotonic())
            sleep(POLL_INTERVAL_S)

    def stop_all(self) -> dict[str, int]:
        """SIGTERM every running node, SIGKILL what is left after the grace; exit codes by node id."""
        running = [c for c in self._children if c.proc is not None and c.proc.poll() is None]
        for child in running:
            assert child.proc is not None
            child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        codes: dict[str, int] = {}
        for child in running:
            assert child.proc is not None
            try:
                codes[child.spec.node_id] = child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._echo(f"node {child.spec.node_id} did not stop within {STOP_GRACE_S:g}s: killing it")
                child.proc.kill()
                codes[child.spec.node_id] = child.proc.wait()
        try:
            (self._data_dir / STATE_FILE).unlink()
        except OSError:
            pass
        return codes

    def _write_state(self) -> None:
        nodes = [
            {
                "id": c.spec.node_id,
                "api": c.spec.api,
                "pid": c.proc.pid if c.proc is not None and c.state == "running" else None,
                "state": c.state,
                "deaths_recent": len(c.deaths),
                "last_exit": c.last_exit,
                "note": c.note,
                "log": str(c.spec.log_path),
            }
            for c in self._children
        ]
        data = json.dumps({"pid": os.getpid(), "nodes": nodes}, indent=1, sort_keys=True)
        tmp = self._data_dir / (STATE_FILE + ".tmp")
        tmp.write_text(data)
        os.replace(tmp, self._data_dir / STATE_FILE)
