"""docker-compose.yml for real: three node containers, the host CLI, a stopped leader, restarts, volumes.

Runs as root on a Debian machine (skipped otherwise, saying why). It installs
Docker Engine, docker-compose and debootstrap from Debian packages if they
are missing, starts dockerd if it is not running (and leaves it running: it
is a machine-wide daemon), and needs no image registry:

- the base image is a debootstrap'd minimal bookworm with python3, imported
  as ``raft-registry-base:bookworm`` once and reused (set
  ``REGCTL_TEST_BASE_IMAGE`` to use another local image instead);
- the Python dependencies are wheels built on the host into ``wheels/``
  (``WHEELS=wheels`` build arg: the image installs with ``--no-index``).

Then: build, ``up -d``, wait until every node is healthy, bootstrap ACLs and
register from the host with ``regctl``, ``stop`` the leader's container,
see another leader elected and writes and reads keep working, ``start`` it
again (with its old IP address taken by another container, the case that once
kept a restarted node from catching up), see it reach the same revision,
``down`` and ``up`` and find the data kept, ``down -v`` at the end, pass or
fail.

Command: ``python -m pytest tests/compose`` (the conftest here lifts the
default ``-m "not slow"`` when only this directory is asked for).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from registry.server.ports import ports_free
from tests.support.cluster import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

REPO = Path(__file__).resolve().parents[2]
BASE_IMAGE = "raft-registry-base:bookworm"
IMAGE = "raft-registry:compose-test"
NODES = ("node1", "node2", "node3")
#: Host ports come from here: the gap between the other users' ranges (regctl demo
#: and test_cli 10000-19500, test clusters 20000-40000, bench 41000-60000,
#: jepsen-lite 61000-65200), below Linux's ephemeral range.
PORT_RANGE = (19_500, 19_990)
#: Rootfs parts no one needs at run time (about half of the debootstrap'd size).
ROOTFS_EXCLUDES = ("./usr/share/doc", "./usr/share/man", "./usr/share/locale", "./usr/share/info",
                   "./var/cache/apt", "./var/lib/apt/lists", "./var/log")
DOCKERD_LOG = Path(tempfile.gettempdir()) / "regctl-compose-test-dockerd.log"


def _run(cmd: Sequence[str], *, timeout_s: float, env: dict[str, str] | None = None, check: bool = True,
         stdin: Any = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout_s, env=env, stdin=stdin,
                          cwd=REPO)
    if check and done.returncode != 0:
        # AssertionError: wait_until retries it, and a failed step says what ran and what it said.
        raise AssertionError(f"{' '.join(cmd)!r} exited {done.returncode}\nstdout: {done.stdout[-3000:]}\n"
                             f"stderr: {done.stderr[-3000:]}")
    return done


# -- the machine: packages, dockerd, base image, wheels ------------------------------------------


def _ensure_packages() -> None:
    wanted = {"dockerd": "docker.io", "docker-compose": "docker-compose", "debootstrap": "debootstrap"}
    missing = [pkg for tool, pkg in wanted.items() if shutil.which(tool) is None]
    if not missing:
        return
    if shutil.which("apt-get") is None:
        pytest.skip(f"missing {', '.join(missing)} and no apt-get to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Other work on the machine may hold the dpkg lock for a while: wait for it, do not fail.
    _run(["apt-get", "-o", "DPkg::Lock::Timeout=600", "update", "-qq"], timeout_s=900, env=env)
    _run(["apt-get", "-o", "DPkg::Lock::Timeout=600", "install", "-y", "-qq", *missing], timeout_s=1200, env=env)


def _docker_answers() -> bool:
    return _run(["docker", "info", "--format", "{{.ServerVersion}}"], timeout_s=30, check=False).returncode == 0


def _ensure_dockerd() -> None:
    if _docker_answers():
        return
    # A daemon for the whole machine, not for this test: it outlives the test on purpose.
    with DOCKERD_LOG.open("ab") as log:
        subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         start_new_session=True)
    wait_until(_docker_answers, 120, f"dockerd to answer (its log: {DOCKERD_LOG})", interval_s=0.5)


def _image_exists(name: str) -> bool:
    return _run(["docker", "image", "inspect", name], timeout_s=60, check=False).returncode == 0


def _ensure_base_image() -> str:
    override = os.environ.get("REGCTL_TEST_BASE_IMAGE")
    if override:
        return override
    if _image_exists(BASE_IMAGE):
        return BASE_IMAGE
    if sys.version_info[:2] != (3, 11):
        # The wheels are built by this interpreter; bookworm's python3 is 3.11.
        pytest.skip("the debootstrap'd bookworm base has Python 3.11: run this test with 3.11 "
                    "or set REGCTL_TEST_BASE_IMAGE to an image with this Python")
    with tempfile.TemporaryDirectory(prefix="regctl-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        _run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,python3-pip", "bookworm",
              str(rootfs), "http://deb.debian.org/debian"], timeout_s=1200)
        excludes = [f"--exclude={p}" for p in ROOTFS_EXCLUDES]
        tar = subprocess.Popen(["tar", "-C", str(rootfs), *excludes, "-c", "."], stdout=subprocess.PIPE)
        try:
            _run(["docker", "import", "--change", "ENV LANG=C.UTF-8", "-", BASE_IMAGE], timeout_s=600,
                 stdin=tar.stdout)
        finally:
            assert tar.stdout is not None
            tar.stdout.close()
            tar.wait(timeout=60)
    return BASE_IMAGE


def _ensure_wheels() -> str:
    """Wheels of every dependency, the build backend and the package in REPO/wheels; returns the build arg."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    reqs = [*project["project"]["dependencies"], *project["build-system"]["requires"]]
    wheels = REPO / "wheels"
    wheels.mkdir(exist_ok=True)
    base = [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(wheels)]
    # Offline first: once the wheels are there, a rerun needs no index at all.
    offline = _run([*base, "--no-index", "--find-links", str(wheels), *reqs], timeout_s=300, check=False)
    if offline.returncode != 0:
        _run([*base, *reqs], timeout_s=900)
    # The package itself, built here with mypyc (#24) so the image needs no compiler: rebuilt every
    # time (the version does not change when the sources do), from the build backend's wheels.
    for old in wheels.glob("raft_registry-*.whl"):
        old.unlink()
    _run([*base, "--no-deps", "--no-index", "--find-links", str(wheels), str(REPO)], timeout_s=600)
    return "wheels"


# -- the compose project ------------------------------------------------------------------


def _free_ports(count: int) -> list[int]:
    rng = secrets.SystemRandom()
    for _ in range(200):
        base = rng.randrange(PORT_RANGE[0], PORT_RANGE[1], 10)
        ports = list(range(base, base + count))
        if ports_free(ports):
            return ports
    raise RuntimeError("no free host ports for the compose test")


@dataclass
class Project:
    name: str
    env: dict[str, str]
    api_ports: dict[str, int]
    fillers: list[str] = field(default_factory=list)

    def compose(self, *args: str, timeout_s: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run(["docker-compose", "-p", self.name, *args], timeout_s=timeout_s, env=self.env, check=check)

    def regctl(self, *args: str, endpoints: Sequence[str] | None = None, timeout_s: float = 60) -> Any:
        eps = ",".join(endpoints) if endpoints else self.env["REGCTL_ENDPOINTS"]
        out = _run(["regctl", "--endpoints", eps, "-o", "json", *args], timeout_s=timeout_s, env=self.env).stdout
        return json.loads(out) if out.strip() else None

    def container(self, service: str) -> str:
        cid = self.compose("ps", "-q", service).stdout.strip()
        assert cid, f"no container for {service}"
        return cid

    def health(self, service: str) -> str:
        cid = self.container(service)
        return _run(["docker", "inspect", "-f", "{{.State.Health.Status}}", cid], timeout_s=30).stdout.strip()

    def wait_healthy(self, services: Sequence[str] = NODES, deadline_s: float = 180) -> None:
        wait_until(lambda: all(self.health(s) == "healthy" for s in services), deadline_s,
                   f"{', '.join(services)} healthy (docker health check)", interval_s=1.0)

    def status(self) -> list[dict[str, Any]]:
        nodes: list[dict[str, Any]] = self.regctl("status", timeout_s=30)
        return nodes

    def logs(self) -> str:
        return self.compose("logs", "--no-color", "--tail", "60", timeout_s=60, check=False).stdout


@dataclass(frozen=True)
class Image:
    base_image: str
    wheels: str


@pytest.fixture(scope="module")
def image() -> Image:
    """Docker running and IMAGE built from this checkout (the base image and the wheels cached)."""
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("the compose test runs Docker Engine: Linux and root only")
    _ensure_packages()
    _ensure_dockerd()
    built = Image(_ensure_base_image(), _ensure_wheels())
    # compose interpolates the whole file even to build: a placeholder key (never part of the image).
    env = {**os.environ, "REGCTL_CLUSTER_KEY": "placeholder-for-the-build-only", "BASE_IMAGE": built.base_image,
           "WHEELS": built.wheels, "REGCTL_IMAGE": IMAGE}
    previous = _run(["docker", "image", "inspect", "-f", "{{.Id}}", IMAGE], timeout_s=60, check=False).stdout.strip()
    # One build: the three node services share the image tag, and `up` builds only a missing image.
    _run(["docker-compose", "-p", f"regctlbuild{os.getpid()}", "build", "node1"], timeout_s=1800, env=env)
    _remove_superseded(previous)
    return built


def _remove_superseded(previous: str) -> None:
    """Drop what earlier builds left: the image IMAGE used to name, and all but the newest build stage.

    The newest build stage stays: it caches the dependency layer for the next build.
    """
    current = _run(["docker", "image", "inspect", "-f", "{{.Id}}", IMAGE], timeout_s=60).stdout.strip()
    stale = [previous] if previous and previous != current else []
    # `docker images` lists the newest first.
    stages = _run(["docker", "images", "-q", "--no-trunc", "--filter", "dangling=true",
                   "--filter", "label=io.raft-registry.stage=build"], timeout_s=60).stdout.split()
    for image_id in [*stale, *stages[1:]]:
        _run(["docker", "rmi", image_id], timeout_s=120, check=False)


@pytest.fixture
def project(image: Image, request: pytest.FixtureRequest) -> Iterator[Project]:
    ports = _free_ports(12)
    api = dict(zip(NODES, ports[:3], strict=True))
    http = dict(zip(NODES, ports[3:6], strict=True))
    dns = dict(zip(NODES, ports[6:9], strict=True))
    consul = dict(zip(NODES, ports[9:], strict=True))
    name = f"regctltest{os.getpid()}"
    env = {
        **os.environ,
        "REGCTL_CLUSTER_KEY": secrets.token_hex(32),
        "BASE_IMAGE": image.base_image,
        "WHEELS": image.wheels,
        "REGCTL_IMAGE": IMAGE,
        # Set, so that a developer's .env (which compose also reads) cannot publish elsewhere.
        "REGCTL_BIND": "127.0.0.1",
        "REGCTL_ENDPOINTS": ",".join(f"127.0.0.1:{p}" for p in api.values()),
    }
    env.pop("REGCTL_TOKEN", None)
    for i, node in enumerate(NODES, start=1):
        env[f"REGCTL_API_PORT{i}"] = str(api[node])
        env[f"REGCTL_HTTP_PORT{i}"] = str(http[node])
        env[f"REGCTL_DNS_PORT{i}"] = str(dns[node])
        env[f"REGCTL_CONSUL_PORT{i}"] = str(consul[node])
    proj = Project(name, env, api)
    try:
        proj.compose("up", "-d", timeout_s=600)
        yield proj
    except BaseException:
        print(proj.logs())
        raise
    else:
        # tests/conftest.py keeps each phase's report on the item: the containers' logs explain a failure.
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(proj.logs())
    finally:
        for filler in proj.fillers:
            _run(["docker", "rm", "-f", "-v", filler], timeout_s=60, check=False)
        down = proj.compose("down", "-v", "--remove-orphans", "--timeout", "10", timeout_s=300, check=False)
        assert down.returncode == 0, f"docker-compose down -v failed: {down.stderr}"


def _leader(proj: Project, not_id: str | None = None) -> tuple[str, int]:
    """(node id, term) of the leader every reachable node agrees on, other than ``not_id``."""
    nodes = [n for n in proj.status() if n.get("reachable")]
    # The image runs the host's mypyc-compiled wheel (#24).
    assert all(n["build"] == "mypyc" for n in nodes), nodes
    leaders = [n for n in nodes if n["role"] == "leader" and n["id"] != not_id]
    assert len(leaders) == 1, f"no single leader yet: {nodes}"
    leader = leaders[0]
    return leader["id"], int(leader["term"])


def _instance_ids(body: dict[str, Any]) -> set[str]:
    return {inst["id"] for inst in body["instances"]}


def test_compose_cluster_failover_catch_up_and_volumes(project: Project) -> None:
    proj = project
    started = time.monotonic()
    proj.wait_healthy()

    # ACLs are on in the compose cluster: the host gets the management token once.
    boot = wait_until(lambda: proj.regctl("acl", "bootstrap"), 60, "acl bootstrap", interval_s=1.0)
    proj.env["REGCTL_TOKEN"] = boot["secret"]

    first = proj.regctl("service", "register", "web", "--address", "10.0.0.5:8080", "--tag", "v1")
    assert first["created"] is True

    # -- stop the leader's container: another leader, writes and reads go on --------------------
    old_leader, old_term = wait_until(lambda: _leader(proj), 60, "a leader")
    assert old_leader in NODES
    proj.compose("stop", old_leader, timeout_s=120)
    # Take the stopped node's address, so it comes back on a different IP and
    # its peers must resolve its name again to reach it.
    network = f"{proj.name}_raft"
    filler = f"{proj.name}_filler"
    proj.fillers.append(filler)
    _run(["docker", "run", "-d", "--rm", "--no-healthcheck", "--name", filler, "--network", network,
          "--entrypoint", "sleep", IMAGE, "600"], timeout_s=120)

    new_leader, new_term = wait_until(lambda: _leader(proj, not_id=old_leader), 60, "a new leader")
    assert new_leader != old_leader and new_term > old_term
    second = wait_until(
        lambda: proj.regctl("service", "register", "web", "--address", "10.0.0.6:8080"), 60, "a write")
    got = proj.regctl("service", "get", "web")
    assert _instance_ids(got) == {"web-10.0.0.5-8080", "web-10.0.0.6-8080"}
    assert got["revision"] >= second["revision"]

    # -- start it again: it catches up ------------------------------------------------------
    old_ip = _run(["docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", filler],
                  timeout_s=30).stdout.strip()
    proj.compose("start", old_leader, timeout_s=120)
    new_ip = _run(["docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                   proj.container(old_leader)], timeout_s=30).stdout.strip()
    print(f"{old_leader} restarted at {new_ip}; its old address {old_ip} is held by {filler}")

    def caught_up() -> bool:
        nodes = proj.status()
        revisions = {n["id"]: n.get("revision") for n in nodes if n.get("reachable")}
        applied = {n.get("applied_index") for n in nodes if n.get("reachable")}
        return (set(revisions) == set(NODES) and len(set(revisions.values())) == 1 and len(applied) == 1
                and revisions[old_leader] >= second["revision"])

    wait_until(caught_up, 90, f"{old_leader} to catch up with the others", interval_s=1.0)
    # Its own local state has the write it missed while stopped.
    local = proj.regctl("service", "get", "web", "--consistency", "stale",
                        endpoints=[f"127.0.0.1:{proj.api_ports[old_leader]}"])
    assert _instance_ids(local) == {"web-10.0.0.5-8080", "web-10.0.0.6-8080"}
    proj.wait_healthy()
    # Off the project's network before `down`, which removes the network.
    _run(["docker", "rm", "-f", "-v", filler], timeout_s=60)

    # -- down, then up: the named volumes keep every node's data -------------------------------
    before = proj.regctl("service", "get", "web")
    proj.compose("down", "--timeout", "15", timeout_s=300)
    volumes = _run(["docker", "volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={proj.name}"],
                   timeout_s=60).stdout.split()
    assert sorted(volumes) == sorted(f"{proj.name}_{n}-data" for n in NODES)
    proj.compose("up", "-d", timeout_s=600)
    proj.wait_healthy()
    after = wait_until(lambda: proj.regctl("service", "get", "web"), 60, "a read after down/up")
    assert _instance_ids(after) == _instance_ids(before)
    assert after["revision"] >= before["revision"]
    # The token issued before `down` is still valid: ACL state is data too.
    third = proj.regctl("service", "register", "web", "--address", "10.0.0.7:8080")
    assert third["revision"] > before["revision"]
    print(f"compose scenario took {time.monotonic() - started:.1f}s after the build")


def test_jepsen_lite_compose_target(image: Image, tmp_path: Path) -> None:
    """jepsen-lite against the compose cluster: docker kill, docker pause, network disconnect."""
    out = tmp_path / "jl"
    # Seed 11 plans, within 25 s: kill the leader, isolate the leader (network disconnect), pause a node.
    done = _run([sys.executable, str(REPO / "jepsen-lite" / "run"), "--target", "compose", "--time-limit", "25",
                 "--seed", "11", "--nemesis", "kill,pause,partition", "--workload", "register,set,lease",
                 "--out", str(out)], timeout_s=900, env={**os.environ, "REGCTL_IMAGE": IMAGE}, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["valid"] is True and results["target"] == "compose"
    assert {f["kind"] for f in results["faults"]} == {"kill", "pause", "partition"}
    assert results["counts"]["ok"] > 0
    # The run took its project down, volumes and network included.
    spec = json.loads((out / "session-spec.json").read_text())
    name = spec["topology"]["compose_project"]
    left = _run(["docker", "ps", "-a", "-q", "--filter", f"label=com.docker.compose.project={name}"], timeout_s=60)
    volumes = _run(["docker", "volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={name}"],
                   timeout_s=60)
    assert not left.stdout.strip() and not volumes.stdout.strip()
