"""Directed scenarios: one fault, timed against one client pattern, repeated.

The random runs find a bug only when the schedule and the clients happen to
line up; a scenario lines them up on purpose and records an ordinary history
for the ordinary checkers.

``lease-deposed-leader`` (netns): grant a lease through the leader, cut the
leader off from its peers, and keep renewing through that node alone (as a
client connected to it would) until it stops acknowledging; meanwhile probe
the lease with linearizable reads through the other nodes, without renewing
it.  The lease checker then asks: did the lease vanish sooner than TTL after
a renewal the cluster acknowledged?

``stale-read`` (netns): cut a follower off, write a new value through the
leader (acknowledged by the majority), then read the key linearizably
through the cut-off follower.  A correct node cannot confirm it is up to
date and times out (``info``); a node that serves linearizable reads from
its local state (``--unsafe local-reads``) answers the old value, which the
register checker rejects.  This is how the suite shows, without relying on
luck, that its checkers catch a stale read.

``rejoin-empty-voter`` (local or netns, one trial; bug 2 in the README): a
node whose disk was wiped, started again under an address that used to be a
member, grants its vote to a lagging node that still has an old
configuration in which that address is a member.  Steps: remove follower B
(stopped, data kept); add the spare S (empty): members {L, A, S}; stop A
(SIGSTOP), so its log ends with that configuration; add B back (its old data)
and remove S, set S's data aside: members {L, A, B}; acknowledged writes that
A never received; start S again, empty (not even a member); stop L and B,
continue A.  A campaigns under {L, A, S}: its own vote and S's are a
majority of that, though neither holds the last writes.  Linearizable reads
through A then returned values older than acknowledged writes (bug 2).
Fixed: A recorded S's data-directory identity when S was added, and
refuses the empty S's messages, so A never leads and its reads time out.
A correct system answers them with the acknowledged values or not at all.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from registry.client import Client
from registry.errors import RegistryError

from .history import Recorder
from .runner import Cluster
from .workload import Context, Worker

__all__ = ["SCENARIOS", "SCENARIO_WORKLOADS", "SCENARIO_TARGETS", "SCENARIO_NEEDS_SPARE", "SCENARIO_NEMESES",
           "lease_deposed_leader", "stale_read", "rejoin_empty_voter"]

#: Lease TTL of the scenario (the registry's minimum): the window to observe is fixed, a short TTL keeps trials short.
TTL_MS = 1000
KEEPALIVE_EVERY_S = 0.02
PROBE_EVERY_S = 0.05
#: How long after cutting the leader off we renew through it, and how long we probe.
RENEW_FOR_S = 1.6
PROBE_FOR_S = 3.0


async def _renew(worker: Worker, lease: int, cut_ns: int) -> None:
    """Renew through the cut-off node only, as a client connected to it would."""
    while time.monotonic_ns() - cut_ns < RENEW_FOR_S * 1e9:
        await worker.op("keepalive", lease, None, "lease_keepalive", {"lease": lease},
                        result=lambda body: body["ttl_ms"], timeout_s=1.0)
        await asyncio.sleep(KEEPALIVE_EVERY_S)


async def _probe(worker: Worker, lease: int, cut_ns: int) -> None:
    """Linearizable reads through the other nodes until the lease is gone."""
    while time.monotonic_ns() - cut_ns < PROBE_FOR_S * 1e9:
        out = await worker.op("probe", lease, None, "lease_get", {"lease": lease, "consistency": "linearizable"},
                              result=lambda body: {"ttl_ms": body["ttl_ms"]}, not_found_ok=True, timeout_s=1.0)
        if out.ok and out.body is None:
            return
        await asyncio.sleep(PROBE_EVERY_S)


async def lease_deposed_leader(cluster: Cluster, recorder: Recorder, seed: int, trials: int,
                               notes: list[str]) -> list[dict[str, Any]]:
    """Run the trials on a started netns cluster; return one fault window per trial."""
    windows: list[dict[str, Any]] = []
    stop = asyncio.Event()
    ctx = Context(cluster.topology.endpoints, recorder, seed, stop, op_timeout_s=2.0)
    for trial in range(trials):
        leader = await cluster.wait_leader(30)
        if leader is None:
            notes.append(f"trial {trial}: no leader, skipped")
            continue
        spec = cluster.nodes[leader].spec
        others = [n.spec.api for nid, n in cluster.nodes.items() if nid != leader]
        pinned = Worker(ctx, "lease", 0)
        await pinned.client.close()
        pinned.client = Client([spec.api], timeout_s=1.0, connect_timeout_s=0.5, client_name="jepsen-pinned")
        prober = Worker(ctx, "lease", 1)
        await prober.client.close()
        prober.client = Client(others, timeout_s=1.0, connect_timeout_s=0.5, client_name="jepsen-prober")
        try:
            out = await pinned.op("grant", None, TTL_MS, "lease_grant", {"ttl_ms": TTL_MS},
                                  result=lambda body: {"lease": body["lease"], "ttl_ms": body["ttl_ms"]},
                                  result_key=lambda body: body["lease"])
            if not out.ok:
                notes.append(f"trial {trial}: grant failed ({out.code})")
                continue
            lease = int(out.body["lease"])
            window: dict[str, Any] = {"kind": "partition", "target": "isolate-leader", "leader": leader,
                                      "nodes": [leader], "trial": trial}
            for other in cluster.nodes:
                if other != leader:
                    await cluster.drop(leader, other)
                    await cluster.drop(other, leader)
            window["start_ns"] = cut = time.monotonic_ns()
            recorder.nemesis("start-partition", [leader], {"target": "isolate-leader", "trial": trial})

            await asyncio.gather(_renew(pinned, lease, cut), _probe(prober, lease, cut))
            await cluster.heal()
            window["end_ns"] = time.monotonic_ns()
            recorder.nemesis("stop-partition", [leader], {"target": "isolate-leader", "trial": trial})
            windows.append(window)
        except RegistryError as err:
            notes.append(f"trial {trial}: {err!r}")
            await cluster.heal()
        finally:
            await pinned.close()
            await prober.close()
        await cluster.wait_healthy(30)
    return windows


async def stale_read(cluster: Cluster, recorder: Recorder, seed: int, trials: int,
                     notes: list[str]) -> list[dict[str, Any]]:
    """Per trial: isolate a follower, write through the leader, read through the follower."""
    windows: list[dict[str, Any]] = []
    ctx = Context(cluster.topology.endpoints, recorder, seed, asyncio.Event(), op_timeout_s=2.0)
    key = "jepsen-r0"

    def read_args() -> dict[str, Any]:
        return {"key": key, "consistency": "linearizable"}

    for trial in range(trials):
        leader = await cluster.wait_leader(30)
        if leader is None:
            notes.append(f"trial {trial}: no leader, skipped")
            continue
        followers = sorted(n for n in cluster.nodes if n != leader)
        victim = followers[trial % len(followers)]
        writer, reader = Worker(ctx, "register", 0), Worker(ctx, "register", 1)
        await writer.client.close()
        await reader.client.close()
        writer.client = Client([cluster.nodes[leader].spec.api], timeout_s=2.0, connect_timeout_s=0.5,
                               client_name="jepsen-stale-writer")
        reader.client = Client([cluster.nodes[victim].spec.api], timeout_s=1.5, connect_timeout_s=0.5,
                               client_name="jepsen-stale-reader")
        try:
            before = writer.unique(f"t{trial}-before-")
            if not (await writer.op("write", key, before, "key_put", {"key": key, "value": before},
                                    result=lambda body: None)).ok:
                notes.append(f"trial {trial}: the first write failed")
                continue
            # Until the follower has applied it (a correct read through it says so too).
            end = time.monotonic() + 10
            while time.monotonic() < end:
                out = await reader.op("read", key, None, "key_get", read_args(), result=lambda body: body["value"],
                                      extra=lambda body: {"mod_revision": body["mod_revision"]}, not_found_ok=True)
                if out.ok and out.body is not None and out.body["value"] == before:
                    break
                await asyncio.sleep(0.05)
            window: dict[str, Any] = {"kind": "partition", "target": "isolate-node", "leader": leader,
                                      "nodes": [victim], "trial": trial}
            for other in cluster.nodes:
                if other != victim:
                    await cluster.drop(victim, other)
                    await cluster.drop(other, victim)
            window["start_ns"] = time.monotonic_ns()
            recorder.nemesis("start-partition", [victim], {"target": "isolate-node", "trial": trial})
            after = writer.unique(f"t{trial}-after-")
            await writer.op("write", key, after, "key_put", {"key": key, "value": after}, result=lambda body: None)
            await reader.op("read", key, None, "key_get", read_args(), result=lambda body: body["value"],
                            extra=lambda body: {"mod_revision": body["mod_revision"]}, not_found_ok=True)
            await cluster.heal()
            window["end_ns"] = time.monotonic_ns()
            recorder.nemesis("stop-partition", [victim], {"target": "isolate-node", "trial": trial})
            windows.append(window)
        except RegistryError as err:
            notes.append(f"trial {trial}: {err!r}")
        finally:
            await cluster.heal()
            await writer.close()
            await reader.close()
        await cluster.wait_healthy(30)
    return windows


async def _until(what: str, check: Any, deadline_s: float, notes: list[str]) -> bool:
    """Poll an async predicate until it holds or the deadline passes (noted)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if await check():
            return True
        await asyncio.sleep(0.1)
    notes.append(f"gave up waiting for {what} after {deadline_s:g}s")
    return False


async def rejoin_empty_voter(cluster: Cluster, recorder: Recorder, seed: int, trials: int,
                             notes: list[str]) -> list[dict[str, Any]]:
    """One trial of the steps in the module docstring; returns its fault window."""
    if trials != 1:
        notes.append("rejoin-empty-voter leaves the cluster changed: one trial only")
    if not cluster.spares:
        raise RuntimeError("rejoin-empty-voter needs a spare node")
    ctx = Context(cluster.topology.endpoints, recorder, seed, asyncio.Event(), op_timeout_s=3.0)
    keys = [f"jepsen-r{i}" for i in range(5)]
    spare = sorted(cluster.spares)[0]
    leader = await cluster.wait_leader(30)
    if leader is None:
        raise RuntimeError("no leader")
    a, b = sorted(n for n in cluster.nodes if n != leader)
    spec = {n: cluster._proc(n).spec for n in (leader, a, b, spare)}
    writer = Worker(ctx, "register", 0)
    last_revision = 0

    async def write(count: int, tag: str) -> None:
        nonlocal last_revision
        for i in range(count):
            value = writer.unique(tag)
            out = await writer.op("write", keys[i % len(keys)], value, "key_put",
                                  {"key": keys[i % len(keys)], "value": value}, result=lambda body: None)
            if out.ok and out.revision is not None:
                last_revision = max(last_revision, out.revision)

    async def applied(node: str) -> bool:
        st = await cluster.status(node)
        return st is not None and int(st.get("revision") or 0) >= last_revision

    window: dict[str, Any] = {"kind": "membership", "target": "rejoin-empty-voter", "leader": leader,
                              "nodes": [a, b, spare], "start_ns": time.monotonic_ns()}
    try:
        await write(10, "w0-")
        # Members {L, A}: B stopped with its data.
        await cluster.call_leader("member_remove", {"raft": spec[b].raft}, 30)
        cluster.kill(b)
        # Members {L, A, S}: S empty.
        await cluster.add_member(spare, 30)
        await write(10, "w1-")
        await _until(f"{a} to apply revision {last_revision}", lambda: applied(a), 20, notes)
        # A's log now ends with the configuration {L, A, S}; freeze it there.
        cluster.pause(a)
        recorder.nemesis("start-pause", [a], {"scenario": "rejoin-empty-voter"})
        # Members {L, A, S, B}, then {L, A, B}; S's disk set aside.
        await cluster.add_member(b, 30)
        await _until(f"{b} to catch up", lambda: applied(b), 30, notes)
        await cluster.remove_member(spare, 30, wipe=True)
        # Acknowledged by L and B; A never received them.
        await write(20, "w2-")
        await _until(f"{b} to apply revision {last_revision}", lambda: applied(b), 20, notes)
        # S again under its old address, empty, not a member.
        cluster.start(spare)
        await _until(f"{spare} to serve", lambda: _serving(cluster, spare), 30, notes)
        # Only A (lagging) and S (empty) run.
        cluster.pause(leader)
        cluster.pause(b)
        cluster.resume(a)
        recorder.nemesis("start-pause", [leader, b], {"scenario": "rejoin-empty-voter", "resumed": a})
        elected = await _until(f"{a} to lead", lambda: _leads(cluster, a), 15, notes)
        window["a_elected"] = elected
        reader = Worker(ctx, "register", 1)
        await reader.client.close()
        reader.client = Client([spec[a].api], timeout_s=5.0, connect_timeout_s=0.5, client_name="jepsen-rejoin")
        try:
            for key in keys:
                await reader.op("read", key, None, "key_get", {"key": key, "consistency": "linearizable"},
                                timeout_s=5.0, result=lambda body: body["value"],
                                extra=lambda body: {"mod_revision": body["mod_revision"]}, not_found_ok=True)
        finally:
            await reader.close()
    finally:
        for node in (leader, a, b):
            cluster.resume(node)
            if not cluster.running(node):
                cluster.start(node)
        cluster.kill(spare)
        window["end_ns"] = time.monotonic_ns()
        recorder.nemesis("stop-pause", [leader, a, b], {"scenario": "rejoin-empty-voter"})
        await writer.close()
    return [window]


async def _serving(cluster: Cluster, node: str) -> bool:
    return await cluster.status(node) is not None


async def _leads(cluster: Cluster, node: str) -> bool:
    st = await cluster.status(node)
    return st is not None and st.get("role") == "leader"


SCENARIOS = {"lease-deposed-leader": lease_deposed_leader, "stale-read": stale_read,
             "rejoin-empty-voter": rejoin_empty_voter}
#: The workload whose checkers judge each scenario's history.
SCENARIO_WORKLOADS = {"lease-deposed-leader": "lease", "stale-read": "register", "rejoin-empty-voter": "register"}
#: Where each scenario can run (partitions need netns).
SCENARIO_TARGETS = {"lease-deposed-leader": ("netns",), "stale-read": ("netns",),
                    "rejoin-empty-voter": ("local", "netns")}
#: The faults each scenario injects (for results.json).
SCENARIO_NEMESES = {"lease-deposed-leader": ["partition"], "stale-read": ["partition"],
                    "rejoin-empty-voter": ["pause", "membership"]}
#: Scenarios that use a spare node (not a member at the start).
SCENARIO_NEEDS_SPARE = frozenset(("rejoin-empty-voter",))
