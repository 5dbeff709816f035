"""Lease benchmark (issue 3): grants/s, keepalives/s with many live leases, leader CPU, memory per lease.

Starts a fresh three-node cluster of real ``regctl server`` processes on 127.0.0.1 (``localcluster``),
then, from one uvloop driver process talking to the leader only:

1. grants ``--leases`` leases (TTL 600 s, ``--grant-concurrency`` in flight over ``--connections``
   connections) and records grants/s;
2. reads every node's RSS (``/proc/PID/status``) before and after granting: bytes per lease;
3. renews the leases round-robin at ``--concurrency`` requests in flight for ``--duration`` seconds
   (after a 1 s warm-up), ``--batch`` lease ids per ``lease_keepalive_batch`` request (``--batch 1``:
   one ``lease_keepalive`` per lease), and records keepalives/s (leases renewed), requests/s, p50/p99
   request latency, leader CPU cores and the driver's own CPU;
4. in this process, with ``tracemalloc``: the bytes per lease of the leader's deadline table
   (``LeaseKeeper``) and of the replicated lease records (``RegistryState``), apart from each other
   and from the bounded per-write tables the RSS delta also contains.

Prints a Markdown table and writes ``DIR/leases.json`` (default ``bench/results/leases-<timestamp>``).
Nothing is sent anywhere but 127.0.0.1.

    python -m bench.leases              # 100k leases, 10 s of keepalives, 100 ids per request
    python -m bench.leases --batch 1    # one lease per request (the lease_keepalive op)
    python -m bench.leases --quick      # 10k leases, 3 s
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

import uvloop

from bench.localcluster import BenchCluster, cpu_seconds, machine_busy_seconds
from registry.client import Client
from registry.errors import RegistryError
from registry.fsm.leases import LeaseKeeper
from registry.fsm.state import RegistryState

TTL_MS = 600_000
WARMUP_S = 1.0
#: Seconds of no load in which the leader's idle CPU is sampled before the keepalives.
IDLE_SAMPLE_S = 2.0
#: Issue 3's targets.
TARGET_KEEPALIVES_S = 50_000
TARGET_BYTES_PER_LEASE = 300


def proc_memory(pid: int) -> dict[str, int]:
    """VmRSS and RssAnon of a process in bytes, from /proc/PID/status."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return float(sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))])


async def connect(endpoint: str, count: int, name: str) -> list[Client]:
    # One endpoint only: leases are served by the leader, no failover to a follower.
    clients = [Client([endpoint], timeout_s=30.0, client_name=f"{name}-{j}") for j in range(count)]
    for client in clients:
        await client.call("status", {})
    return clients


async def node_summaries(endpoints: list[str]) -> list[dict[str, Any]]:
    """Every node's role, term, applied index, revision and live lease count (a divergence check)."""
    client = Client(endpoints, timeout_s=2.0, connect_timeout_s=0.5)
    try:
        statuses = await client.cluster_status()
    finally:
        await client.close()
    keys = ("id", "reachable", "role", "term", "applied_index", "revision", "leases")
    return [{k: st.get(k) for k in keys} for st in statuses]


async def find_leader(endpoints: list[str]) -> str | None:
    """The API address of the node that says it is leader (None if none does)."""
    client = Client(endpoints, timeout_s=2.0, connect_timeout_s=0.5)
    try:
        for status in await client.cluster_status():
            if status.get("reachable") and status.get("role") == "leader":
                return str(status["api"])
    finally:
        await client.close()
    return None


class StateTtls:
    """What a node hands its LeaseKeeper (registry.server.lease_service._StateTtls), minus the StateHolder."""

    def __init__(self, state: RegistryState) -> None:
        self._state = state

    def get(self, lease: int, /) -> int | None:
        return self._state.lease_ttl_ms(lease)

    def __len__(self) -> int:
        return self._state.lease_count()


def traced_bytes_per_lease(n: int) -> dict[str, float]:
    """Steady-state Python heap per lease, by tracemalloc, of the two structures that grow with leases.

    *replicated records*: a ``RegistryState`` after ``n`` grants (every node holds this), without the
    request-id table (the grants carry no rid) and without events (dropped).  *deadline table*: the
    ``LeaseKeeper`` of a leader of those leases after every lease was renewed once (the leader only).
    """
    tracemalloc.start()
    try:
        state = RegistryState()
        base = tracemalloc.get_traced_memory()[0]
        for i in range(n):
            state.apply({"op": "lease_grant", "ttl_ms": TTL_MS, "now_ms": 1_764_000_000_000 + i})
        records = tracemalloc.get_traced_memory()[0] - base
        ttls = state.lease_ttls()
        ids = list(ttls)
        keeper = LeaseKeeper(ttls=StateTtls(state))
        base = tracemalloc.get_traced_memory()[0]
        keeper.reset_all(ttls, 0.0)
        keeper.keepalive_many(ids, 1.0)
        table = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    return {"leases": n, "replicated_records_bytes_per_lease": records / n,
            "deadline_table_bytes_per_lease": table / n}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


async def grant_all(clients: list[Client], total: int, concurrency: int) -> tuple[list[int], Counter[str], float]:
    leases: list[int] = []
    errors: Counter[str] = Counter()
    remaining = iter(range(total))

    async def worker(client: Client) -> None:
        for _ in remaining:
            try:
                leases.append(await client.lease_grant(TTL_MS))
                if len(leases) % 20_000 == 0:
                    log(f"granted {len(leases):,} leases")
            except RegistryError as err:
                errors[err.code] += 1

    began = time.monotonic()
    await asyncio.gather(*(worker(clients[w % len(clients)]) for w in range(concurrency)))
    return leases, errors, time.monotonic() - began


async def prefill(clients: list[Client], total: int, concurrency: int) -> float:
    remaining = iter(range(total))

    async def worker(client: Client) -> None:
        for i in remaining:
            await client.call("key_put", {"key": "bench/prefill", "value": str(i % 10)})

    began = time.monotonic()
    await asyncio.gather(*(worker(clients[w % len(clients)]) for w in range(concurrency)))
    return time.monotonic() - began


async def keepalive_load(clients: list[Client], leases: list[int], concurrency: int, duration_s: float,
                         leader_pid: int, batch: int) -> dict[str, Any]:
    latencies: list[int] = []
    errors: Counter[str] = Counter()
    renewed = [0]
    missing = [0]
    n_leases = len(leases)
    counter = iter(range(1 << 62))
    # Doubled so a batch that wraps around the end is one slice.
    ring = leases + leases[:batch]
    now = time.monotonic
    start = now()
    window_start = start + WARMUP_S
    window_end = window_start + duration_s
    marks: dict[str, float] = {}

    async def sampler() -> None:
        await asyncio.sleep(max(0.0, window_start - now()))
        marks.update(t0=now(), leader0=cpu_seconds(leader_pid), driver0=cpu_seconds(os.getpid()),
                     machine0=machine_busy_seconds())
        await asyncio.sleep(max(0.0, window_end - now()))
        marks.update(t1=now(), leader1=cpu_seconds(leader_pid), driver1=cpu_seconds(os.getpid()),
                     machine1=machine_busy_seconds())

    async def worker(client: Client) -> None:
        record = latencies.append
        while True:
            began = now()
            if began >= window_end:
                return
            start = (next(counter) * batch) % n_leases
            try:
                # No retries: a refusal (not leader, ...) counts as an error instead of hiding in the latency.
                if batch == 1:
                    await client.call("lease_keepalive", {"lease": leases[start]}, timeout_s=10.0, retry=False)
                    done, lost = 1, 0
                else:
                    _, body = await client.call("lease_keepalive_batch", {"leases": ring[start : start + batch]},
                                                timeout_s=10.0, retry=False)
                    done, lost = body["renewed"], len(body["missing"])
            except RegistryError as err:
                if began >= window_start:
                    errors[err.code] += 1
                continue
            ended = now()
            if window_start <= ended <= window_end:
                record(int((ended - began) * 1e6))
                renewed[0] += done
                missing[0] += lost

    await asyncio.gather(sampler(), *(worker(clients[w % len(clients)]) for w in range(concurrency)))
    wall = marks["t1"] - marks["t0"]
    latencies.sort()
    leader_cores = (marks["leader1"] - marks["leader0"]) / wall
    driver_cores = (marks["driver1"] - marks["driver0"]) / wall
    machine_cores = (marks["machine1"] - marks["machine0"]) / wall
    keepalives = renewed[0]
    return {
        "batch": batch, "requests": len(latencies), "requests_per_s": len(latencies) / wall,
        "keepalives": keepalives, "missing": missing[0], "window_s": wall, "keepalives_per_s": keepalives / wall,
        "p50_ms": percentile(latencies, 0.50) / 1000, "p99_ms": percentile(latencies, 0.99) / 1000,
        "mean_ms": statistics.fmean(latencies) / 1000 if latencies else float("nan"),
        "errors": dict(errors), "leader_cores": leader_cores, "driver_cores": driver_cores,
        "machine_busy_cores": machine_cores,
        "other_cores": max(0.0, machine_cores - leader_cores - driver_cores),
        # CPU cost per op: what the rate would be if the leader had a whole core to itself.
        "leader_cpu_us_per_keepalive": leader_cores * wall / max(1, keepalives) * 1e6,
        "driver_cpu_us_per_keepalive": driver_cores * wall / max(1, keepalives) * 1e6,
    }


async def run(args: argparse.Namespace, cluster: BenchCluster, leader_id: str) -> dict[str, Any]:
    leader = cluster.node(leader_id)
    log(f"leader {leader_id} at {leader.api}; granting {args.leases:,} leases")
    pids = {n.node_id: n.pid for n in cluster.nodes}
    grant_clients = await connect(leader.api, args.connections, "lease-grant")
    await asyncio.sleep(1.0)  # let startup settle before the baseline RSS
    mem_start = {nid: proc_memory(pid) for nid, pid in pids.items()}
    prefill_s = 0.0
    if args.prefill:
        # Fill the bounded per-write tables (request ids, event history) before the baseline, so the
        # RSS delta of the grants is what the leases add, not those tables filling up.
        log(f"prefill: {args.prefill:,} writes of one key")
        prefill_s = await prefill(grant_clients, args.prefill, args.grant_concurrency)
        await asyncio.sleep(2.0)
    mem_before = {nid: proc_memory(pid) for nid, pid in pids.items()}
    cpu0 = cpu_seconds(leader.pid)
    leases, grant_errors, grant_s = await grant_all(grant_clients, args.leases, args.grant_concurrency)
    grant_leader_cores = (cpu_seconds(leader.pid) - cpu0) / grant_s
    for client in grant_clients:
        await client.close()
    await asyncio.sleep(2.0)  # followers finish applying the grants
    mem_after = {nid: proc_memory(pid) for nid, pid in pids.items()}
    memory: dict[str, Any] = {}
    for nid in pids:
        d_rss = mem_after[nid]["VmRSS"] - mem_before[nid]["VmRSS"]
        d_anon = mem_after[nid].get("RssAnon", 0) - mem_before[nid].get("RssAnon", 0)
        memory[nid] = {"start": mem_start[nid], "before": mem_before[nid], "after": mem_after[nid],
                       "rss_bytes_per_lease": d_rss / max(1, len(leases)),
                       "anon_bytes_per_lease": d_anon / max(1, len(leases))}
    cluster.check_alive()
    # Leadership may have moved while granting on a loaded machine: keepalives go to the leader of now.
    api_now = await find_leader(cluster.endpoints)
    leader_changed = api_now is not None and api_now != leader.api
    if api_now is not None and leader_changed:
        leader = next(n for n in cluster.nodes if n.api == api_now)
        log(f"leadership moved during the grants: now {leader.node_id}")
    log(f"{len(leases):,} leases granted in {grant_s:.1f}s; keepalives for {WARMUP_S:g}+{args.duration:g}s")
    ka_clients = await connect(leader.api, args.connections, "lease-keepalive")
    # The leader's CPU with no requests (Raft heartbeats, the lease tick): at low keepalive rates on a
    # starved machine it is a large part of "CPU per keepalive", so the table also shows the net figure.
    idle0, idle_t0 = cpu_seconds(leader.pid), time.monotonic()
    await asyncio.sleep(IDLE_SAMPLE_S)
    idle_cores = (cpu_seconds(leader.pid) - idle0) / (time.monotonic() - idle_t0)
    keepalive = await keepalive_load(ka_clients, leases, args.concurrency, args.duration, leader.pid, args.batch)
    keepalive["leader_idle_cores"] = idle_cores
    keepalive["leader_net_cpu_us_per_keepalive"] = (
        max(0.0, keepalive["leader_cores"] - idle_cores) * keepalive["window_s"] / max(1, keepalive["keepalives"]) * 1e6
    )
    for client in ka_clients:
        await client.close()
    cluster.check_alive()
    api_end = await find_leader(cluster.endpoints)
    await asyncio.sleep(1.0)  # followers catch up before the comparison
    final = await node_summaries(cluster.endpoints)
    return {
        "final_status": final,
        "leader": leader_id, "leader_for_keepalives": leader.node_id,
        "leader_changed_while_granting": leader_changed,
        "leader_changed_while_keepalive": api_end != leader.api,
        "leases_requested": args.leases, "leases_granted": len(leases),
        "grant": {"seconds": grant_s, "grants_per_s": len(leases) / grant_s, "errors": dict(grant_errors),
                  "concurrency": args.grant_concurrency, "leader_cores": grant_leader_cores},
        "memory": memory, "prefill": {"writes": args.prefill, "seconds": prefill_s},
        "keepalive": {**keepalive, "concurrency": args.concurrency, "connections": args.connections},
    }


def table(result: dict[str, Any]) -> str:
    g, k, mem = result["grant"], result["keepalive"], result["memory"]
    leader = result["leader"]
    followers = [nid for nid in mem if nid != leader]
    lead_mem = mem[leader]

    def ok(met: bool) -> str:
        return "met" if met else "missed"

    prefilled = result["prefill"]["writes"]
    mem_note = f", after {prefilled:,} prefill writes" if prefilled else ", incl. request ids and history"

    def per_lease(nid: str) -> str:
        return f"{mem[nid]['rss_bytes_per_lease']:.0f} B RSS ({mem[nid]['anon_bytes_per_lease']:.0f} B anon)"

    saturated = "saturated" if k["driver_cores"] >= 0.9 else "not saturated"

    rows = [
        ("leases granted", f"{result['leases_granted']:,} (TTL {TTL_MS // 1000} s)", ""),
        ("lease grants/s", f"{g['grants_per_s']:,.0f} (c={g['concurrency']}, leader {g['leader_cores']:.2f} cores)",
         "etcd 3.4: ~3.1k"),
        ("keepalives/s", f"{k['keepalives_per_s']:,.0f} ({k['batch']} lease(s) per request, "
         f"c={k['concurrency']} requests over {k['connections']} conns)",
         f">= {TARGET_KEEPALIVES_S:,}: {ok(k['keepalives_per_s'] >= TARGET_KEEPALIVES_S)} (etcd 3.4: ~4.7k)"),
        ("keepalive requests/s", f"{k['requests_per_s']:,.0f}", ""),
        ("request p50 / p99", f"{k['p50_ms']:.2f} / {k['p99_ms']:.2f} ms", ""),
        ("keepalive errors", json.dumps(k["errors"]) if k["errors"] else "none", ""),
        ("leader CPU (keepalives)", f"{k['leader_cores']:.2f} cores, {k['leader_cpu_us_per_keepalive']:.1f} µs/op "
         f"(~{1e6 / max(1e-9, k['leader_cpu_us_per_keepalive']):,.0f}/s per leader core)", ""),
        ("leader CPU net of idle", f"idle {k['leader_idle_cores']:.2f} cores; "
         f"{k['leader_net_cpu_us_per_keepalive']:.1f} µs/op above idle", ""),
        ("driver CPU", f"{k['driver_cores']:.2f} cores ({saturated}), {k['driver_cpu_us_per_keepalive']:.0f} µs/op",
         ""),
        ("other machine CPU", f"{k['other_cores']:.2f} cores (of {os.cpu_count()})", ""),
        (f"leader memory / lease (RSS delta{mem_note})", per_lease(leader),
         f"< {TARGET_BYTES_PER_LEASE} B: {ok(lead_mem['rss_bytes_per_lease'] < TARGET_BYTES_PER_LEASE)}"),
    ]
    for nid in followers:
        rows.append((f"follower {nid} memory / lease", per_lease(nid), ""))
    traced = result.get("traced")
    if traced:
        table_b, records_b = traced["deadline_table_bytes_per_lease"], traced["replicated_records_bytes_per_lease"]
        rows.append(("leader deadline table / lease", f"{table_b:.0f} B (tracemalloc, {traced['leases']:,} leases)",
                     "leader only"))
        rows.append(("replicated lease records / lease", f"{records_b:.0f} B (tracemalloc)", "every node"))
        rows.append(("leader steady state / lease", f"{table_b + records_b:.0f} B",
                     f"< {TARGET_BYTES_PER_LEASE} B: {ok(table_b + records_b < TARGET_BYTES_PER_LEASE)}"))
    changes = [what for what, key in (("granting", "leader_changed_while_granting"),
                                      ("keepalives", "leader_changed_while_keepalive")) if result[key]]
    rows.append(("leader changes", "during " + " and ".join(changes) if changes else "none", ""))
    final = result["final_status"]
    rows.append(("term at end", ", ".join(f"{st['id']}: {st['term']} ({st['role']})" for st in final), ""))
    rows.append(("live leases per node at end", ", ".join(f"{st['id']}: {st['leases']}" for st in final),
                 "all equal to leases granted"))
    rows.append(("loadavg before / after", f"{result['loadavg_before']} / {result['loadavg_after']}", ""))
    lines = ["| metric | value | target |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--leases", type=int, default=100_000)
    parser.add_argument("--duration", type=float, default=10.0, help="keepalive measurement window, seconds")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="keepalive requests in flight (default: 256 with --batch 1, else 16: 1,600 leases)")
    parser.add_argument("--batch", type=int, default=100,
                        help="lease ids per lease_keepalive_batch request (1: lease_keepalive, one per request)")
    parser.add_argument("--grant-concurrency", type=int, default=512, help="grants in flight")
    parser.add_argument("--connections", type=int, default=8, help="client connections to the leader")
    parser.add_argument("--prefill", type=int, default=None,
                        help="key writes before the grants, so the request-id table and event history are "
                             "already full at the RSS baseline (default: as many as --leases; 0: none)")
    parser.add_argument("--quick", action="store_true", help="10k leases, 3 s")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--keep-data", action="store_true", help="keep the nodes' data dirs and logs")
    args = parser.parse_args()
    if args.quick:
        args.leases, args.duration = 10_000, 3.0
    if args.prefill is None:
        args.prefill = args.leases
    if args.concurrency is None:
        # 256 x 100 leases in flight only queues: throughput is the same, latency 20x worse.
        args.concurrency = 256 if args.batch == 1 else 16
    out: Path = args.out or Path(__file__).resolve().parent / "results" / time.strftime("leases-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)

    before = loadavg()
    cluster = BenchCluster(keep_data=args.keep_data)
    try:
        leader_id = cluster.start()
        uvloop.install()
        result = asyncio.run(run(args, cluster, leader_id))
    finally:
        cluster.stop()
    log("measuring per-lease heap with tracemalloc")
    result["traced"] = traced_bytes_per_lease(args.leases)
    result.update(loadavg_before=before, loadavg_after=loadavg(), cpus=os.cpu_count(),
                  started=time.strftime("%Y-%m-%dT%H:%M:%S"))
    md = table(result)
    print(md)
    (out / "leases.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "leases.md").write_text(md + "\n")
    print(f"\nwrote {out / 'leases.json'}" + (f"; node data in {cluster.root}" if args.keep_data else ""))


if __name__ == "__main__":
    main()
