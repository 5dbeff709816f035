"""The README's commands, taken from its code blocks and run as a newcomer would.

Nothing here copies a command: the walkthrough's ``sh`` block is run line by
line, in order, against a ``regctl up`` started with the README's own command;
only the endpoints differ, given through ``REGCTL_ENDPOINTS`` (which the
README documents) so the test cluster can use free ports.  A README change
that breaks a command fails here.  Commands that need root, Docker or etcd
run elsewhere, and ``test_every_readme_command_is_run_somewhere`` holds each
section of the README to the place that runs it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.test_cli import _free_base_port
from tests.integration.test_jepsen_smoke import _netns_missing
from tests.support.cluster import wait_until
from tests.support.readme import REPO, Command, commands, find_command

pytestmark = pytest.mark.integration

README = REPO / "README.md"
OPERATIONS = REPO / "docs" / "operations.md"

#: README sections whose commands this file runs.
WALKTHROUGH = "A two-minute walkthrough"
RUN_HERE = {WALKTHROUGH, "Agent: sidecar load balancing", "Testing and jepsen-lite"}
#: README sections whose commands run elsewhere, and where.
RUN_ELSEWHERE = {
    "Install and run": ".ci/run",  # and `regctl up`, which the fixture below takes from there
    "Run in containers": "tests/compose/test_compose.py",
    "Performance": "tests/integration/test_bench_compare.py",
}
#: What the compose test runs for each command of the README's container section (it drives the
#: compose CLI itself, with a project name and free ports of its own).
COMPOSE_EQUIVALENTS = {
    'echo "REGCTL_CLUSTER_KEY=': '"REGCTL_CLUSTER_KEY": secrets.token_hex(32)',
    "docker compose up -d": 'proj.compose("up", "-d"',
    "regctl acl bootstrap": 'proj.regctl("acl", "bootstrap")',
}


def _run(cmd: str, env: dict[str, str], cwd: Path, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, shell=True, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout_s)


def _ok(cmd: str, env: dict[str, str], cwd: Path, timeout_s: float = 60.0) -> str:
    done = _run(cmd, env, cwd, timeout_s)
    assert done.returncode == 0, f"{cmd!r} exited {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"
    return done.stdout


@dataclass
class Background:
    """A README command ending in ``&``: started without a shell, so that Ctrl-C (SIGINT) reaches regctl."""

    command: str
    proc: subprocess.Popen[str]
    output: Path

    @classmethod
    def start(cls, command: str, env: dict[str, str], cwd: Path, output: Path) -> Background:
        with open(output, "w") as sink:
            proc = subprocess.Popen(shlex.split(command), env=env, cwd=cwd, stdout=sink, stderr=subprocess.STDOUT,
                                    text=True, start_new_session=True)
        return cls(command, proc, output)

    def text(self) -> str:
        return self.output.read_text()

    def stop(self, timeout_s: float = 20.0) -> int:
        """Ctrl-C, as the README says; SIGKILL to the whole group if it does not end in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            return -signal.SIGKILL


#: The fixture's base port, for the README's Consul and DNS ports (``regctl up``'s defaults: base 7000).
_BASE_ENV = "REGCTL_TEST_BASE_PORT"


def _localized(command: str, env: dict[str, str]) -> str:
    """The README's command with ``regctl up``'s default Consul and DNS ports moved to the fixture's base."""
    base = int(env[_BASE_ENV])
    return command.replace("localhost:7301", f"localhost:{base + 301}").replace("-p 7401", f"-p {base + 401}")


@pytest.fixture
def up_cluster(tmp_path: Path) -> Iterator[tuple[dict[str, str], Path]]:
    """The README's ``regctl up``, on free ports and in the test's directory."""
    up = find_command(README, "regctl up").text
    base = _free_base_port()
    env = {**os.environ, "REGCTL_ENDPOINTS": ",".join(f"127.0.0.1:{base + i}" for i in (1, 2, 3)),
           _BASE_ENV: str(base)}
    proc = Background.start(f"{up} --data-dir {tmp_path / 'regctl-data'} --base-port {base}", env, tmp_path,
                            tmp_path / "up.out")
    try:
        wait_until(lambda: '"role": "leader"' in _run("regctl -o json status", env, tmp_path).stdout,
                   40, "a leader in regctl up")
        yield env, tmp_path
    finally:
        code = proc.stop()
        assert code == 0, proc.text()


def _section(name: str) -> list[Command]:
    found = [c for c in commands(README) if c.section == name]
    assert found, f"the README has no commands under '## {name}'"
    return found


def test_every_readme_command_is_run_somewhere() -> None:
    """Each section with commands is run here or by a named test or CI script that does run them."""
    for command in commands(README):
        assert command.section in RUN_HERE | set(RUN_ELSEWHERE), (
            f"README line {command.line}: no test runs the commands under '## {command.section}'; "
            f"run them here or name their runner in RUN_ELSEWHERE")
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    for command in _section("Install and run"):
        if command.text.startswith("regctl up"):
            continue  # the fixture runs it
        assert command.text in ci, f"README line {command.line}: .ci/run does not run {command.text!r}"
    here = Path(__file__).read_text()
    anchors_here = re.findall(r'find_command\(README, "([^"]+)"', here)
    for command in commands(README):
        if command.section in RUN_HERE and command.section != WALKTHROUGH:  # the walkthrough runs whole
            assert any(command.text.startswith(a) for a in anchors_here), (
                f"README line {command.line}: no test here runs {command.text!r}")
    bench_test = (REPO / RUN_ELSEWHERE["Performance"]).read_text()
    anchors = re.findall(r'readme_bench\("([^"]+)"', bench_test)
    for command in _section("Performance"):
        assert any(command.text.startswith(a) for a in anchors), (
            f"README line {command.line}: {RUN_ELSEWHERE['Performance']} does not run {command.text!r}")
    compose_test = (REPO / RUN_ELSEWHERE["Run in containers"]).read_text()
    for command in _section("Run in containers"):
        equivalent = next((v for k, v in COMPOSE_EQUIVALENTS.items() if command.text.startswith(k)), None)
        assert equivalent is not None, f"README line {command.line}: add {command.text!r} to COMPOSE_EQUIVALENTS"
        assert equivalent in compose_test, f"the compose test no longer runs {equivalent!r}"


def _elected(env: dict[str, str], cwd: Path) -> bool:
    out = _run("regctl -o json lease list", env, cwd).stdout
    return bool(out) and any(item.get("locks") for item in json.loads(out)["leases"])


Check = Callable[[str], bool]


def _wait_started(bg: Background, ready: Callable[[Background], bool]) -> None:
    wait_until(lambda: bg.proc.poll() is None and ready(bg), 20, f"{bg.command!r} to start")


def test_walkthrough(up_cluster: tuple[dict[str, str], Path]) -> None:
    env, cwd = up_cluster

    def get_web() -> str:
        return _ok("regctl service get web", env, cwd)

    # What each command must print (by its start); a key no command matches fails the test, so a
    # changed command gets its check updated rather than silently dropped.
    checks: dict[str, Check] = {
        "regctl status": lambda out: "leader" in out,
        "regctl service list": lambda out: "web" in out and "revision:" in out,
        "regctl service get web --consistency stale": lambda out: "revision:" in out,
        "regctl service status web web-10.0.0.5-8080 critical": lambda out: "critical (set)" in out,
        "regctl -o json service get web": lambda out: (
            {i["address"] for i in json.loads(out)["instances"]} == {"10.0.0.5", "10.0.0.6"}),
        "curl -s 'localhost:7301/v1/health/service/web?passing'": lambda out: (
            [e["Service"]["Address"] for e in json.loads(out)] == ["10.0.0.6"]),
        "dig @127.0.0.1 -p 7401 +short web.service.consul": lambda out: out.split() == ["10.0.0.6"],
        "regctl lease grant 5s && regctl lease list": lambda out: "granted" in out and "LEASE" in out,
        "regctl lock deploy": lambda out: "fencing token " in out and "fencing token \n" not in out,
    }
    # For a background command: what must hold before the next command runs.
    ready: dict[str, Callable[[Background], bool]] = {
        "regctl service register web --address 10.0.0.6:8080": lambda _: "10.0.0.6" in get_web(),
        "regctl watch web --list": lambda bg: "exists instance web/" in bg.text(),
        "regctl elect scheduler": lambda _: _elected(env, cwd),
    }
    used: set[str] = set()
    background: list[Background] = []
    try:
        for n, command in enumerate(_section(WALKTHROUGH)):
            if command.text.endswith("&"):
                bg = Background.start(command.text[:-1].strip(), env, cwd, cwd / f"bg-{n}.out")
                background.append(bg)
                for prefix, cond in ready.items():
                    if command.text.startswith(prefix):
                        used.add(prefix)
                        _wait_started(bg, cond)
                continue
            out = _ok(_localized(command.text, env), env, cwd)
            for prefix, check in checks.items():
                if command.text.startswith(prefix):
                    used.add(prefix)
                    assert check(out), f"README line {command.line}: {command.text!r} printed\n{out}"
        assert used == set(checks) | set(ready), f"no README command for {set(checks) | set(ready) - used}"
        assert "critical" in get_web() and "zone=a" in get_web()

        keeper, watcher, elect = background
        assert keeper.stop() == 0, keeper.text()
        wait_until(lambda: "10.0.0.6" not in get_web(), 20, "deregistration on Ctrl-C")
        wait_until(lambda: "delete instance web/" in watcher.text(), 20, "the watch to show the deletion")
        assert watcher.stop() == 0, watcher.text()
        assert elect.stop() == 0 and "elected leader of scheduler" in elect.text(), elect.text()
    finally:
        for bg in background:
            bg.stop()


def test_operations(up_cluster: tuple[dict[str, str], Path]) -> None:
    """docs/operations.md's backup and inspection commands (test_ops and test_identity run its membership ones)."""
    env, cwd = up_cluster
    _ok(find_command(README, "regctl service register web --address 10.0.0.5:8080").text, env, cwd)
    saved = _ok(find_command(OPERATIONS, "regctl snapshot save").text, env, cwd)
    assert "saved backup at revision" in saved
    restored = _ok(find_command(OPERATIONS, "regctl snapshot restore").text, env, cwd)
    assert "restored revision" in restored and (cwd / "new" / "n3" / "seed.snapshot").exists()
    members = _ok(find_command(OPERATIONS, "regctl member list").text, env, cwd)
    assert members.count("127.0.0.1:") >= 3 and "leader" in members
    top = _ok(find_command(OPERATIONS, "regctl top").text + " --count 1", env, cwd)  # it refreshes until Ctrl-C
    assert "NODE" in top and "leader" in top


def test_demo(tmp_path: Path) -> None:
    out = _ok(find_command(README, "regctl demo").text, {**os.environ}, tmp_path, timeout_s=180)
    assert "kill" in out.lower(), out


def _jepsen(command: Command, out: Path) -> dict[str, object]:
    """A README jepsen-lite command, shortened (argparse: the last --time-limit and --out win)."""
    argv = shlex.split(command.text)
    if argv[0] == "sudo":
        argv = argv[1:]  # the test runs as root already (or is skipped)
    assert argv[0] == "jepsen-lite/run", argv
    done = subprocess.run([sys.executable, *argv, "--time-limit", "5", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results: dict[str, object] = json.loads((out / "results.json").read_text())
    assert results["valid"] is True
    return results


def test_jepsen_local(tmp_path: Path) -> None:
    _jepsen(find_command(README, "jepsen-lite/run --"), tmp_path / "jl")


@pytest.mark.slow
@pytest.mark.skipif(_netns_missing() is not None, reason=f"netns target: {_netns_missing()}")
def test_jepsen_netns(tmp_path: Path) -> None:
    _jepsen(find_command(README, "sudo jepsen-lite/run"), tmp_path / "jl-netns")
