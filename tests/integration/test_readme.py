"""The README's walkthrough and operations commands, run as a newcomer would.

Each command is the README's text; only the endpoints differ, given through
``REGCTL_ENDPOINTS`` (which the README documents) so the test cluster can use
free ports.  If a README command changes, change it here too.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_cli import _free_base_port
from tests.support.cluster import wait_until

pytestmark = pytest.mark.integration


def _run(cmd: str, env: dict[str, str], cwd: Path, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, shell=True, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout_s)


def _ok(cmd: str, env: dict[str, str], cwd: Path, timeout_s: float = 60.0) -> str:
    done = _run(cmd, env, cwd, timeout_s)
    assert done.returncode == 0, f"{cmd!r} exited {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"
    return done.stdout


def _start(cmd: str, env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    # No shell: Ctrl-C (SIGINT) must reach regctl itself.
    return subprocess.Popen(shlex.split(cmd), env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _stop(proc: subprocess.Popen[str], sig: int = signal.SIGINT, timeout_s: float = 20.0) -> tuple[int, str]:
    """Send ``sig`` (Ctrl-C by default); return the exit code and what it printed."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    return proc.returncode, (out or "") + (err or "")


@pytest.fixture
def up_cluster(tmp_path: Path) -> Iterator[tuple[dict[str, str], Path]]:
    base = _free_base_port()
    env = {**os.environ, "REGCTL_ENDPOINTS": ",".join(f"127.0.0.1:{base + i}" for i in (1, 2, 3))}
    proc = _start(f"regctl up --data-dir {tmp_path / 'regctl-data'} --base-port {base}", env, tmp_path)
    try:
        wait_until(lambda: '"role": "leader"' in _run("regctl -o json status", env, tmp_path).stdout,
                   40, "a leader in regctl up")
        yield env, tmp_path
    finally:
        code, out = _stop(proc)
        assert code == 0, out


def test_walkthrough(up_cluster: tuple[dict[str, str], Path]) -> None:
    env, cwd = up_cluster
    assert "leader" in _ok("regctl status", env, cwd)
    _ok("regctl service register web --address 10.0.0.5:8080 --tag v1 --meta zone=a", env, cwd)
    keeper = _start("regctl service register web --address 10.0.0.6:8080 --ttl 10s --keepalive", env, cwd)
    try:
        wait_until(lambda: "10.0.0.6" in _ok("regctl service get web", env, cwd), 20, "the kept-alive instance")
        listing = _ok("regctl service list", env, cwd)
        assert "web" in listing and "revision:" in listing
        assert "zone=a" in _ok("regctl service get web", env, cwd)
        assert "revision:" in _ok("regctl service get web --consistency stale", env, cwd)
        assert "critical (set)" in _ok('regctl service status web web-10.0.0.5-8080 critical --note "disk full"',
                                       env, cwd)
        assert "critical" in _ok("regctl service get web", env, cwd)
        body = json.loads(_ok("regctl -o json service get web", env, cwd))
        assert {i["address"] for i in body["instances"]} == {"10.0.0.5", "10.0.0.6"}

        watch_out = cwd / "watch.out"
        with open(watch_out, "w") as sink:
            watcher = subprocess.Popen(shlex.split("regctl watch web --list"), env=env, cwd=cwd, stdout=sink,
                                       stderr=subprocess.STDOUT, text=True, start_new_session=True)
        # The watch must have printed its snapshot before the change it must also show.
        wait_until(lambda: "exists instance web/" in watch_out.read_text(), 20, "the watch's snapshot")
    finally:
        code, out = _stop(keeper)
        assert code == 0, out  # Ctrl-C deregisters
    wait_until(lambda: "10.0.0.6" not in _ok("regctl service get web", env, cwd), 20, "deregistration on Ctrl-C")
    wait_until(lambda: "delete instance web/" in watch_out.read_text(), 20, "the watch to show the deletion")
    code, out = _stop(watcher)
    assert code == 0, watch_out.read_text()

    leases = _ok("regctl lease grant 5s && regctl lease list", env, cwd)
    assert "granted" in leases and "LEASE" in leases
    locked = _ok("regctl lock deploy -- sh -c 'echo \"fencing token $REGCTL_LOCK_TOKEN\"; sleep 2'", env, cwd)
    assert "fencing token" in locked

    elect = _start("regctl elect scheduler --value host-a", env, cwd)
    try:
        wait_until(lambda: _elected(env, cwd), 20, "the election lock")
    finally:
        code, out = _stop(elect)
    assert code == 0 and "elected leader of scheduler" in out, out


def _elected(env: dict[str, str], cwd: Path) -> bool:
    out = _run("regctl -o json lease list", env, cwd).stdout
    return bool(out) and any(item.get("locks") for item in json.loads(out)["leases"])


def test_operations(up_cluster: tuple[dict[str, str], Path]) -> None:
    env, cwd = up_cluster
    _ok("regctl service register web --address 10.0.0.5:8080 --tag v1 --meta zone=a", env, cwd)
    saved = _ok("regctl snapshot save backup.snap", env, cwd)
    assert "saved backup at revision" in saved
    restored = _ok("regctl snapshot restore backup.snap --data-dir ./new --nodes 3", env, cwd)
    assert "restored revision" in restored and (cwd / "new" / "n3" / "seed.snapshot").exists()
    members = _ok("regctl member list", env, cwd)
    assert members.count("127.0.0.1:") >= 3 and "leader" in members
    top = _ok("regctl top --count 1", env, cwd)
    assert "NODE" in top and "leader" in top


def test_demo(tmp_path: Path) -> None:
    out = _ok("regctl demo", {**os.environ}, tmp_path, timeout_s=180)
    assert "killed" in out.lower() or "kill" in out.lower(), out
