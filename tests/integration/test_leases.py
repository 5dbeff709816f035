"""Leases and locks on real node processes: expiry, keepalive across failover, fencing, CLI.

Threads here (keepalivers, pollers, lock workers) each own a ``SyncClient``
with a short per-call timeout: a SIGSTOPped node accepts TCP connections but
never answers, so a long timeout would pin a client to it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from registry.client import SyncClient
from registry.errors import Conflict, NotFound, RegistryError, Unavailable
from registry.fsm.model import LEASE_KEEPALIVE_IDS_MAX
from tests.support.cluster import Cluster, NodeProc, regctl_executable, wait_until
from tests.support.workers import Worker, running

pytestmark = pytest.mark.integration

TTL_MS = 2000
TTL_S = TTL_MS / 1000


# -- helpers ----------------------------------------------------------------------------------------


class KeepAliver(Worker):
    """Renews one lease every ttl/3 through its own client, as a well-behaved client would."""

    def __init__(self, endpoints: list[str], lease: int, ttl_ms: int = TTL_MS) -> None:
        super().__init__(f"keepalive-{lease}")
        self.endpoints = endpoints
        self.lease = lease
        self.interval_s = ttl_ms / 3000
        self.renewed = 0
        self.failed: dict[str, int] = {}
        self.lost: RegistryError | None = None

    def body(self) -> None:
        # One attempt may take a third of the TTL; a timed-out one moves on to the next node.
        with SyncClient(self.endpoints, timeout_s=self.interval_s, connect_timeout_s=0.3) as client:
            while not self.stopping.is_set():
                try:
                    client.lease_keepalive(self.lease)
                except NotFound as err:
                    self.lost = err
                    return
                except Unavailable as err:
                    self.failed[err.code] = self.failed.get(err.code, 0) + 1
                    continue
                self.renewed += 1
                self.stopping.wait(self.interval_s)


class Poller(Worker):
    """Linearizable reads of one service in a loop; records every read that misses the instance."""

    def __init__(self, endpoints: list[str], service: str, instance_ids: set[str]) -> None:
        super().__init__(f"poll-{service}")
        self.endpoints = endpoints
        self.service = service
        self.instance_ids = instance_ids
        self.reads: list[tuple[float, int]] = []  # (time, revision) of good reads
        self.unavailable = 0
        self.missing: list[tuple[float, str]] = []

    def body(self) -> None:
        with SyncClient(self.endpoints, timeout_s=1.0, connect_timeout_s=0.3) as client:
            while not self.stopping.is_set():
                try:
                    revision, body = client.get_service(self.service)
                except Unavailable:
                    self.unavailable += 1
                    continue
                except RegistryError as err:
                    self.missing.append((time.monotonic(), f"{err.code}: {err.message}"))
                    continue
                ids = {i["id"] for i in body["instances"]}
                if self.instance_ids <= ids:
                    self.reads.append((time.monotonic(), revision))
                else:
                    self.missing.append((time.monotonic(), f"revision {revision}: instances {sorted(ids)}"))
                self.stopping.wait(0.05)

    def reads_after(self, t: float) -> int:
        return sum(1 for at, _ in self.reads if at > t)


def observe(seconds: float, *workers: Worker, also: Callable[[], None] = lambda: None) -> None:
    """Let the workers run for ``seconds`` (an observation window), failing fast if one crashes."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for w in workers:
            w.check()
        also()
        time.sleep(min(0.1, max(0.0, end - time.monotonic())))


def flowing(*keepers: KeepAliver, poller: Poller) -> None:
    """Wait until every keepaliver has renewed and the poller has read, before disturbing anything."""
    def ready() -> bool:
        for w in (*keepers, poller):
            w.check()
        return all(k.renewed >= 2 for k in keepers) and len(poller.reads) >= 2

    try:
        wait_until(ready, 10, "traffic")
    except AssertionError as err:
        raise AssertionError(
            f"{err}; renewed {[k.renewed for k in keepers]}, keepalive failures {[k.failed for k in keepers]}, "
            f"reads {len(poller.reads)}, unavailable reads {poller.unavailable}, missing {poller.missing[:3]}"
        ) from None


def new_leader(cluster: Cluster, old: NodeProc, deadline_s: float = 15.0) -> NodeProc:
    def other() -> NodeProc | None:
        leader = cluster.leader()
        return leader if leader is not None and leader is not old else None

    return wait_until(other, deadline_s, f"a leader other than {old.node_id}")


def instance_ids(client: SyncClient, service: str) -> set[str]:
    try:
        _, body = client.get_service(service)
    except NotFound:
        return set()
    return {i["id"] for i in body["instances"]}


def register_on_lease(client: SyncClient, service: str, iid: str, ttl_ms: int = TTL_MS) -> int:
    lease = client.lease_grant(ttl_ms)
    client.register(service, iid, "127.0.0.1", 9, lease=lease)
    return lease


def linearizable_revision(client: SyncClient) -> int:
    revision, _ = client.call("service_list", {"consistency": "linearizable"})
    return revision


# -- expiry ---------------------------------------------------------------------------------------------


def test_instance_without_keepalive_is_gone_within_ttl_on_every_node(cluster: Cluster) -> None:
    client = cluster.client()
    pinned = {n.node_id: cluster.client([n.api], timeout_s=2.0) for n in cluster.nodes}
    sent = time.monotonic()
    lease = register_on_lease(client, "expiring", "e1")
    registered = time.monotonic()
    for node_id, c in pinned.items():
        assert instance_ids(c, "expiring") == {"e1"}, f"not visible on {node_id} right after registration"

    # Poll every node until it reads the instance gone; note when each first did.
    gone_at: dict[str, float] = {}

    def all_gone() -> bool:
        for node_id, c in pinned.items():
            if node_id not in gone_at and instance_ids(c, "expiring") == set():
                gone_at[node_id] = time.monotonic()
        return len(gone_at) == len(pinned)

    wait_until(all_gone, registered + TTL_S + 1.0 - time.monotonic(), "the instance to expire on every node")
    for node_id, at in gone_at.items():
        assert at >= sent + TTL_S - 0.05, f"{node_id} saw the instance gone {at - sent:.2f}s after the grant"
    # The lease went with it, and a gone instance stays gone.
    for c in pinned.values():
        with pytest.raises(NotFound):
            c.call("lease_get", {"lease": lease})
        _, body = c.get_service("expiring")
        assert body["instances"] == []


# -- keepalive across failover ------------------------------------------------------------------------


@pytest.mark.parametrize("disruption", ["kill", "pause"])
def test_kept_alive_instance_survives_leader_failure(cluster: Cluster, disruption: str) -> None:
    """Kept alive by a client thread, and by `regctl service register --keepalive`: never gone."""
    client = cluster.client()
    lease = register_on_lease(client, "web", "w1")
    keeper = KeepAliver(cluster.endpoints, lease)
    cli_id = "web-127.0.0.1-10"
    poller = Poller(cluster.endpoints, "web", {"w1", cli_id})
    regctl = Regctl(cluster.endpoints)
    try:
        with running(keeper):
            cli = regctl.start("service", "register", "web", "--address", "127.0.0.1:10", "--ttl", "2s",
                               "--keepalive")
            wait_until(lambda: cli_id in instance_ids(client, "web"), 10, "the CLI's instance")
            old = cluster.wait_leader()
            with running(poller):
                flowing(keeper, poller=poller)
                disrupted = time.monotonic()
                if disruption == "kill":
                    cluster.kill(old)
                    new_leader(cluster, old)
                else:
                    cluster.pause(old)
                    try:
                        new_leader(cluster, old)
                        # Deliberate: stay paused for longer than the TTL.
                        time.sleep(max(0.0, disrupted + 1.5 * TTL_S - time.monotonic()))
                    finally:
                        cluster.resume(old)
                resumed = time.monotonic()
                observe(2 * TTL_S, keeper, poller)
            poller.check()
            assert poller.missing == [], f"reads missed a kept-alive instance: {poller.missing[:5]}"
            assert poller.reads_after(resumed) >= 5, "too few successful reads after the failure to judge"
            for node in cluster.nodes:
                if node is old and disruption == "kill":
                    continue
                pinned = cluster.client([node.api], timeout_s=5.0)
                assert instance_ids(pinned, "web") == {"w1", cli_id}, f"instance missing on {node.node_id}"
                pinned.call("lease_get", {"lease": lease})
            assert cli.poll() is None, f"regctl exited: {cli.communicate()}"
            cli.send_signal(signal.SIGINT)
            _, err = cli.communicate(timeout=15)
            assert cli.returncode == 0, err
            assert instance_ids(client, "web") == {"w1"}
        keeper.check()
        assert keeper.lost is None, f"the lease was lost: {keeper.lost!r} (failures {keeper.failed})"
    finally:
        regctl.close()


def test_expiry_by_a_deposed_leader_never_applies(cluster: Cluster) -> None:
    """The old leader wakes with deadlines that say "expired": its expiry must not reach the state.

    Pausing for more than twice the TTL defeats the stall guard (which extends by one TTL at
    most), so it is the epoch / leadership checks that must hold.  Nobody writes meanwhile,
    so any committed expiry would show as a revision change.
    """
    client = cluster.client()
    leases = {f"d{i}": register_on_lease(client, "deposed", f"d{i}") for i in range(3)}
    keepers = [KeepAliver(cluster.endpoints, lease) for lease in leases.values()]
    poller = Poller(cluster.endpoints, "deposed", set(leases))
    old = cluster.wait_leader()
    revision = linearizable_revision(client)
    with running(*keepers, poller):
        flowing(*keepers, poller=poller)
        cluster.pause(old)
        paused = time.monotonic()
        try:
            new = new_leader(cluster, old)
            time.sleep(max(0.0, paused + 2.5 * TTL_S - time.monotonic()))  # deliberate: > 2 x TTL
        finally:
            cluster.resume(old)
        resumed = time.monotonic()

        def old_follows() -> bool:
            status = cluster.status(old)
            return status["role"] == "follower" and status["leader"] == new.raft

        wait_until(old_follows, 10, "the old leader to follow the new one")
        observe(3 * TTL_S, *keepers, poller)
    for w in (*keepers, poller):
        w.check()
    assert [k.lost for k in keepers] == [None] * len(keepers)
    assert poller.missing == [], f"reads missed instances: {poller.missing[:5]}"
    assert poller.reads_after(resumed) >= 10
    assert {rev for at, rev in poller.reads if at > paused} <= {revision}, "something was written or expired"
    assert linearizable_revision(client) == revision
    for node in cluster.nodes:
        pinned = cluster.client([node.api], timeout_s=5.0)
        assert instance_ids(pinned, "deposed") == set(leases), f"instances missing on {node.node_id}"
        _, listed = pinned.call("lease_list", {})
        assert {item["lease"] for item in listed} == set(leases.values())
    old_log = old.log_path.read_text(errors="replace")
    assert "Traceback" not in old_log, old_log[-3000:]


# -- locks ----------------------------------------------------------------------------------------------


@dataclass
class Hold:
    token: int
    start: float
    end: float
    worker: str
    lost: bool


class LockWorker(Worker):
    """Loops {grant, acquire (retrying on CONFLICT), hold while renewing, release}; records each hold."""

    def __init__(self, endpoints: list[str], lock: str, holder: str) -> None:
        super().__init__(f"lock-{holder}")
        self.endpoints = endpoints
        self.lock = lock
        self.holder = holder
        self.holds: list[Hold] = []

    def body(self) -> None:
        with SyncClient(self.endpoints, timeout_s=1.0, connect_timeout_s=0.3) as client:
            while not self.stopping.is_set():
                try:
                    lease = client.lease_grant(TTL_MS)
                except Unavailable:
                    continue
                try:
                    self._round(client, lease)
                finally:
                    with contextlib.suppress(RegistryError):
                        client.lease_revoke(lease)

    def _round(self, client: SyncClient, lease: int) -> None:
        renewed = time.monotonic()
        token: int | None = None
        while not self.stopping.is_set() and time.monotonic() - renewed < TTL_S / 2:
            try:
                _, body = client.call("lock_acquire", {"name": self.lock, "lease": lease, "holder": self.holder})
                token = int(body["token"])
                break
            except (Conflict, Unavailable):
                pass
            except NotFound:
                return  # our lease is gone
            sent = time.monotonic()
            try:
                client.lease_keepalive(lease)
                renewed = sent
            except NotFound:
                return
            except Unavailable:
                pass
            self.stopping.wait(0.05)
        if token is None:
            return
        start = time.monotonic()
        end = start
        lost = False
        # Hold for a while, renewing; the lock is ours only up to the last renewal that succeeded.
        while time.monotonic() < start + 0.3:
            self.stopping.wait(0.1)
            sent = time.monotonic()
            try:
                client.lease_keepalive(lease)
            except RegistryError:
                lost = True
                break
            end = sent
        self.holds.append(Hold(token, start, end, self.holder, lost))
        with contextlib.suppress(RegistryError):
            client.call("lock_release", {"name": self.lock, "lease": lease})


def test_lock_holders_never_overlap_under_leader_kill_and_pause(cluster: Cluster) -> None:
    workers = [LockWorker(cluster.endpoints, "jobs/critical", f"w{i}") for i in range(3)]
    with running(*workers):
        observe(2.0, *workers)
        first = cluster.wait_leader()
        cluster.kill(first)
        killed = time.monotonic()
        new_leader(cluster, first)
        observe(1.5, *workers)
        cluster.start_node(first)  # back to three nodes, so a pause keeps a majority
        wait_until(lambda: cluster.status(first)["leader"] is not None, 15, "the restarted node to rejoin")
        second = cluster.wait_leader()
        cluster.pause(second)
        paused = time.monotonic()
        try:
            new_leader(cluster, second)
            time.sleep(max(0.0, paused + 1.5 * TTL_S - time.monotonic()))  # deliberate: > TTL
        finally:
            cluster.resume(second)
        resumed = time.monotonic()
        observe(2.5, *workers)
    for w in workers:
        w.check()
    holds = sorted((h for w in workers for h in w.holds), key=lambda h: h.start)
    assert len(holds) >= 8, f"too few acquisitions to judge: {holds}"
    assert len({h.worker for h in holds}) >= 2, "only one worker ever got the lock"
    assert any(h.start > killed for h in holds) and any(h.start > resumed for h in holds)
    tokens = [h.token for h in holds]
    assert all(a < b for a, b in itertools.pairwise(tokens)), f"tokens not increasing: {tokens}"
    for a, b in itertools.pairwise(holds):
        assert a.end < b.start, f"overlapping holders: {a} and {b}"


# -- bad input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "args", "codes"),
    [
        ("lease_grant", {"ttl_ms": 0}, {"INVALID_ARGUMENT"}),
        ("lease_grant", {"ttl_ms": -5000}, {"INVALID_ARGUMENT"}),
        ("lease_grant", {"ttl_ms": 999}, {"INVALID_ARGUMENT"}),
        ("lease_grant", {"ttl_ms": 86_400_001}, {"INVALID_ARGUMENT"}),
        ("lease_grant", {"ttl_ms": 2**63}, {"INVALID_ARGUMENT", "BAD_REQUEST"}),
        ("lease_grant", {"ttl_ms": "5000"}, {"BAD_REQUEST"}),
        ("lease_grant", {"ttl_ms": 5000.0}, {"BAD_REQUEST"}),
        ("lease_grant", {"ttl_ms": True}, {"BAD_REQUEST"}),
        ("lease_grant", {"ttl_ms": None}, {"BAD_REQUEST"}),
        ("lease_grant", {}, {"BAD_REQUEST"}),
        ("lease_grant", {"ttl_ms": 5000, "bogus": 1}, {"BAD_REQUEST"}),
        ("lease_keepalive", {"lease": 424242}, {"NOT_FOUND"}),
        ("lease_keepalive", {"lease": "1"}, {"BAD_REQUEST"}),
        ("lease_keepalive", {}, {"BAD_REQUEST"}),
        ("lease_keepalive", {"lease": 1, "ttl_ms": 5}, {"BAD_REQUEST"}),
        ("lease_keepalive_batch", {}, {"BAD_REQUEST"}),
        ("lease_keepalive_batch", {"leases": 1}, {"BAD_REQUEST"}),
        ("lease_keepalive_batch", {"leases": [1, "2"]}, {"BAD_REQUEST"}),
        ("lease_keepalive_batch", {"leases": [True]}, {"BAD_REQUEST"}),
        ("lease_keepalive_batch", {"leases": [1.0]}, {"BAD_REQUEST"}),
        ("lease_keepalive_batch", {"leases": [1], "ttl_ms": 5}, {"BAD_REQUEST"}),
        ("lease_keepalive_batch", {"leases": []}, {"INVALID_ARGUMENT"}),
        ("lease_keepalive_batch", {"leases": [424242] * (LEASE_KEEPALIVE_IDS_MAX + 1)}, {"INVALID_ARGUMENT"}),
        ("lease_revoke", {"lease": 424242}, {"NOT_FOUND"}),
        ("lease_revoke", {"lease": 0}, {"INVALID_ARGUMENT"}),
        ("lease_revoke", {"lease": -1}, {"INVALID_ARGUMENT"}),
        ("lease_revoke", {"lease": "x"}, {"BAD_REQUEST"}),
        ("lease_ttl", {"lease": 424242}, {"NOT_FOUND"}),
        ("lease_get", {"lease": 424242}, {"NOT_FOUND"}),
        ("lock_acquire", {"name": "l", "lease": 424242, "holder": "me"}, {"NOT_FOUND"}),
        ("lock_release", {"name": "l", "lease": 424242}, {"NOT_FOUND"}),
    ],
)
def test_bad_lease_requests_are_refused_and_change_nothing(
    shared_cluster: Cluster, op: str, args: dict[str, Any], codes: set[str]
) -> None:
    client = shared_cluster.client()
    before = linearizable_revision(client)
    _, leases_before = client.call("lease_list", {})
    with pytest.raises(RegistryError) as info:
        client.call(op, args)
    assert info.value.code in codes, f"{op} {args}: {info.value!r}"
    assert linearizable_revision(client) == before
    assert client.call("lease_list", {})[1] == leases_before


def test_revoked_lease_cannot_be_kept_alive_or_revoked_again(shared_cluster: Cluster) -> None:
    client = shared_cluster.client()
    lease = register_on_lease(client, "revoked", "r1", 60_000)
    client.call("lock_acquire", {"name": "revoked-lock", "lease": lease, "holder": "me"})
    assert client.lease_keepalive(lease) == 60_000
    result = client.lease_revoke(lease)
    assert (result["instances"], result["locks"]) == (1, 1)
    revision = linearizable_revision(client)
    assert revision == result["revision"]
    for op in ("lease_keepalive", "lease_revoke", "lease_ttl", "lease_get"):
        with pytest.raises(NotFound):
            client.call(op, {"lease": lease})
    with pytest.raises(NotFound):
        client.call("lock_acquire", {"name": "revoked-lock", "lease": lease, "holder": "me"})
    assert instance_ids(client, "revoked") == set()
    with pytest.raises(NotFound):
        client.call("lock_get", {"name": "revoked-lock"})
    assert linearizable_revision(client) == revision


def test_keepalive_batch_renews_many_reports_the_missing_and_keeps_them_alive(shared_cluster: Cluster) -> None:
    # Start at a follower: the batch is refused there with NOT_LEADER and the client follows the hint.
    leader = shared_cluster.wait_leader()
    followers_first = [n.api for n in shared_cluster.nodes if n is not leader] + [leader.api]
    client = shared_cluster.client(followers_first)
    kept = [register_on_lease(client, "batch-kept", f"k{i}") for i in range(3)]
    lapsing = register_on_lease(client, "batch-lapsing", "l1")
    revoked = client.lease_grant(60_000)
    client.lease_revoke(revoked)
    # Duplicates are renewed twice; a revoked and a never-granted id are reported, not fatal.
    ask = [kept[0], kept[1], revoked, 424242, kept[2], kept[0]]
    result = client.lease_keepalive_many(ask)
    assert result == {"renewed": 4, "ttl_ms": [TTL_MS, TTL_MS, 0, 0, TTL_MS, TTL_MS], "missing": [revoked, 424242]}
    # More ids than one request may carry: the client splits them, in order.
    many = client.lease_keepalive_many([kept[1]] * (LEASE_KEEPALIVE_IDS_MAX + 5))
    assert (many["renewed"], many["missing"], len(many["ttl_ms"])) == (LEASE_KEEPALIVE_IDS_MAX + 5, [],
                                                                      LEASE_KEEPALIVE_IDS_MAX + 5)
    # Renewed by batches only, for 2 TTLs: the kept leases live, the one left out expires.
    end = time.monotonic() + 2 * TTL_S
    while time.monotonic() < end:
        assert client.lease_keepalive_many(kept)["missing"] == []
        _, body = client.call("lease_ttl", {"lease": kept[2]})
        assert body["remaining_ms"] > TTL_MS - 1000
        time.sleep(TTL_S / 4)  # the renewal period: this loop is the keepalive client, not a wait
    assert instance_ids(client, "batch-kept") == {"k0", "k1", "k2"}
    wait_until(lambda: not instance_ids(client, "batch-lapsing"), TTL_S + 2, "the lapsed lease's instance gone")
    assert client.lease_keepalive_many([lapsing, kept[0]])["missing"] == [lapsing]
    for lease in kept:
        client.lease_revoke(lease)


# -- CLI ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One cluster for the tests that disturb nothing (bad input, CLI)."""
    c = Cluster(tmp_path_factory.mktemp("leases") / "cluster", 3)
    try:
        c.start()
        yield c
    finally:
        c.close()


@dataclass
class Regctl:
    endpoints: list[str]
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "REGCTL_ENDPOINTS": ",".join(self.endpoints)}

    def run(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run([regctl_executable(), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def start(self, *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen([regctl_executable(), *args], env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


@pytest.fixture
def regctl(shared_cluster: Cluster) -> Iterator[Regctl]:
    r = Regctl(shared_cluster.endpoints)
    try:
        yield r
    finally:
        r.close()


def test_cli_keepalive_of_several_leases_renews_all_and_exits_when_one_is_lost(
    regctl: Regctl, shared_cluster: Cluster
) -> None:
    # 5 s, not 2: the leases must outlive regctl's interpreter start on a loaded machine.
    ttl_ms = 5000
    client = shared_cluster.client()
    a, b = client.lease_grant(ttl_ms), client.lease_grant(ttl_ms)
    proc = regctl.start("lease", "keepalive", str(a), str(b))
    assert proc.stderr is not None
    assert "keeping 2 leases alive" in proc.stderr.readline()
    time.sleep(1.5 * ttl_ms / 1000)  # both would have expired without the one-request-per-round renewals
    assert proc.poll() is None, proc.communicate()
    assert {client.call("lease_get", {"lease": x})[1]["lease"] for x in (a, b)} == {a, b}
    client.lease_revoke(b)
    assert proc.wait(timeout=10) == 1
    assert f"lease(s) {b} not found" in proc.communicate()[1]
    client.lease_revoke(a)


def test_cli_lease_grant_list_ttl_revoke(regctl: Regctl) -> None:
    # 30 s, not 5: each regctl run costs an interpreter start, which is slow on a loaded machine.
    out = regctl.run("-o", "json", "lease", "grant", "30s")
    assert out.returncode == 0, out.stderr
    granted = json.loads(out.stdout)
    lease = granted["lease"]
    assert granted["ttl_ms"] == 30_000

    out = regctl.run("-o", "json", "lease", "list")
    assert out.returncode == 0, out.stderr
    listed = {item["lease"]: item for item in json.loads(out.stdout)["leases"]}
    assert listed[lease]["ttl_ms"] == 30_000

    out = regctl.run("-o", "json", "lease", "ttl", str(lease))
    assert out.returncode == 0, out.stderr
    ttl = json.loads(out.stdout)
    assert ttl["lease"] == lease and 0 < ttl["remaining_ms"] <= 30_000

    out = regctl.run("lease", "ttl", str(lease))
    assert out.returncode == 0 and f"lease {lease}:" in out.stdout and "of 30s left" in out.stdout

    out = regctl.run("lease", "revoke", str(lease))
    assert out.returncode == 0, out.stderr
    assert f"lease {lease} revoked" in out.stdout
    out = regctl.run("-o", "json", "lease", "list")
    assert lease not in {item["lease"] for item in json.loads(out.stdout)["leases"]}

    for args in (("lease", "revoke", str(lease)), ("lease", "ttl", str(lease)), ("lease", "keepalive", str(lease))):
        out = regctl.run(*args)
        assert out.returncode == 1 and "NOT_FOUND" in out.stderr, (args, out)
    # Out of range is a usage error, found before sending (the node's own check: test_bad_lease_requests...).
    for ttl_arg in ("0s", "100000h"):
        out = regctl.run("lease", "grant", ttl_arg)
        assert out.returncode == 2 and "TTL must be 1s..24h" in out.stderr, (ttl_arg, out)
    out = regctl.run("lease", "grant", "soon")
    assert out.returncode == 2, out


def test_cli_register_with_keepalive_deregisters_on_sigint(regctl: Regctl, shared_cluster: Cluster) -> None:
    client = shared_cluster.client()
    proc = regctl.start("service", "register", "cli-web", "--address", "127.0.0.1:9", "--ttl", "2s", "--keepalive")
    wait_until(lambda: instance_ids(client, "cli-web") == {"cli-web-127.0.0.1-9"}, 10, "the CLI's instance")
    # It outlives its TTL while the command runs.
    poller = Poller(shared_cluster.endpoints, "cli-web", {"cli-web-127.0.0.1-9"})

    def still_running() -> None:
        assert proc.poll() is None, f"regctl exited early: {proc.communicate()}"

    with running(poller):
        observe(2 * TTL_S, poller, also=still_running)
    assert poller.missing == [] and len(poller.reads) >= 10
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert "deregistered" in err
    assert instance_ids(client, "cli-web") == set()
    _, leases = client.call("lease_list", {})
    assert all(item["instances"] == 0 for item in leases)


def test_cli_lock_runs_the_command_with_a_token(regctl: Regctl, shared_cluster: Cluster) -> None:
    # It renews every 10 s here: it must not wait for the next renewal to notice the command is done,
    # so the whole run has a deadline below that (subprocess.TimeoutExpired if it lingers).
    out = regctl.run("lock", "cli-lock-a", "--ttl", "30s", "--", "sh", "-c", "echo $REGCTL_LOCK_TOKEN", timeout=8)
    assert out.returncode == 0, out.stderr
    token = int(out.stdout.strip())
    assert f"fencing token {token}" in out.stderr
    with pytest.raises(NotFound):
        shared_cluster.client().call("lock_get", {"name": "cli-lock-a"})
    out = regctl.run("lock", "cli-lock-a", "--", "sh", "-c", "exit 7")
    assert out.returncode == 7, out.stderr


def test_cli_lock_no_wait_fails_while_held(regctl: Regctl, shared_cluster: Cluster) -> None:
    client = shared_cluster.client()
    holder = regctl.start("lock", "cli-lock-b", "--", "sleep", "5")
    held = wait_until(lambda: client.call("lock_get", {"name": "cli-lock-b"})[1], 10, "the first holder")
    revision = linearizable_revision(client)
    out = regctl.run("lock", "cli-lock-b", "--no-wait", "--", "true")
    assert out.returncode == 1, out
    assert "CONFLICT" in out.stderr
    assert client.call("lock_get", {"name": "cli-lock-b"})[1] == held
    # The refused attempt granted and revoked its own lease: two revisions, no more, and no lease left behind.
    assert linearizable_revision(client) == revision + 2
    _, leases = client.call("lease_list", {})
    assert [item["lease"] for item in leases if item["locks"]] == [held["lease"]]
    holder.send_signal(signal.SIGINT)
    holder.communicate(timeout=15)
    assert holder.returncode == 130
    with pytest.raises(NotFound):
        client.call("lock_get", {"name": "cli-lock-b"})
