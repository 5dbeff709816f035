"""Lease benchmark (issue 3): grants/s, keepalives/s with many live leases, leader CPU, memory per lease.

Starts a fresh three-node cluster of real ``regctl server`` processes on 127.0.0.1 (``localcluster``),
then, from one uvloop driver process talking to the leader only:

1. grants ``--leases`` leases (TTL 600 s, ``--grant-concurrency`` in flight over ``--connections``
   connections) and records grants/s;
2. reads every node's RSS (``/proc/PID/status``) before and after granting: bytes per lease;
3. renews the leases round-robin at ``--concurrency`` in flight for ``--duration`` seconds (after a
   1 s warm-up) and records keepalives/s, p50/p99 latency, leader CPU cores and the driver's own CPU.

Prints a Markdown table and writes ``DIR/leases.json`` (default ``bench/results/leases-<timestamp>``).
Nothing is sent anywhere but 127.0.0.1.

    python bench/leases.py            # 100k leases, 10 s of keepalives
    python bench/leases.py --quick    # 10k leases, 3 s
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))

from localcluster import BenchCluster, cpu_seconds, machine_busy_seconds

from registry.client import Client
from registry.errors import RegistryError

TTL_MS = 600_000
WARMUP_S = 1.0
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


async def keepalive_load(clients: list[Client], leases: list[int], concurrency: int, duration_s: float,
                         leader_pid: int) -> dict[str, Any]:
    latencies: list[int] = []
    errors: Counter[str] = Counter()
    n_leases = len(leases)
    counter = iter(range(1 << 62))
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
            lease = leases[next(counter) % n_leases]
            try:
                # No retries: a refusal (not leader, ...) counts as an error instead of hiding in the latency.
                await client.call("lease_keepalive", {"lease": lease}, timeout_s=10.0, retry=False)
            except RegistryError as err:
                if began >= window_start:
                    errors[err.code] += 1
                continue
            ended = now()
            if window_start <= ended <= window_end:
                record(int((ended - began) * 1e6))

    await asyncio.gather(sampler(), *(worker(clients[w % len(clients)]) for w in range(concurrency)))
    wall = marks["t1"] - marks["t0"]
    latencies.sort()
    leader_cores = (marks["leader1"] - marks["leader0"]) / wall
    driver_cores = (marks["driver1"] - marks["driver0"]) / wall
    machine_cores = (marks["machine1"] - marks["machine0"]) / wall
    return {
        "keepalives": len(latencies), "window_s": wall, "keepalives_per_s": len(latencies) / wall,
        "p50_ms": percentile(latencies, 0.50) / 1000, "p99_ms": percentile(latencies, 0.99) / 1000,
        "mean_ms": statistics.fmean(latencies) / 1000 if latencies else float("nan"),
        "errors": dict(errors), "leader_cores": leader_cores, "driver_cores": driver_cores,
        "machine_busy_cores": machine_cores,
        "other_cores": max(0.0, machine_cores - leader_cores - driver_cores),
        # CPU cost per op: what the rate would be if the leader had a whole core to itself.
        "leader_cpu_us_per_keepalive": leader_cores * wall / max(1, len(latencies)) * 1e6,
        "driver_cpu_us_per_keepalive": driver_cores * wall / max(1, len(latencies)) * 1e6,
    }


async def run(args: argparse.Namespace, cluster: BenchCluster, leader_id: str) -> dict[str, Any]:
    leader = cluster.node(leader_id)
    log(f"leader {leader_id} at {leader.api}; granting {args.leases:,} leases")
    pids = {n.node_id: n.pid for n in cluster.nodes}
    grant_clients = await connect(leader.api, args.connections, "lease-grant")
    await asyncio.sleep(1.0)  # let startup settle before the baseline RSS
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
        memory[nid] = {"before": mem_before[nid], "after": mem_after[nid],
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
    keepalive = await keepalive_load(ka_clients, leases, args.concurrency, args.duration, leader.pid)
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
        "memory": memory,
        "keepalive": {**keepalive, "concurrency": args.concurrency, "connections": args.connections},
    }


def table(result: dict[str, Any]) -> str:
    g, k, mem = result["grant"], result["keepalive"], result["memory"]
    leader = result["leader"]
    followers = [nid for nid in mem if nid != leader]
    lead_mem = mem[leader]

    def ok(met: bool) -> str:
        return "met" if met else "missed"

    def per_lease(nid: str) -> str:
        return f"{mem[nid]['rss_bytes_per_lease']:.0f} B RSS ({mem[nid]['anon_bytes_per_lease']:.0f} B anon)"

    saturated = "saturated" if k["driver_cores"] >= 0.9 else "not saturated"

    rows = [
        ("leases granted", f"{result['leases_granted']:,} (TTL {TTL_MS // 1000} s)", ""),
        ("lease grants/s", f"{g['grants_per_s']:,.0f} (c={g['concurrency']}, leader {g['leader_cores']:.2f} cores)",
         "etcd 3.4: ~3.1k"),
        ("keepalives/s", f"{k['keepalives_per_s']:,.0f} (c={k['concurrency']} over {k['connections']} conns)",
         f">= {TARGET_KEEPALIVES_S:,}: {ok(k['keepalives_per_s'] >= TARGET_KEEPALIVES_S)} (etcd 3.4: ~4.7k)"),
        ("keepalive p50 / p99", f"{k['p50_ms']:.2f} / {k['p99_ms']:.2f} ms", ""),
        ("keepalive errors", json.dumps(k["errors"]) if k["errors"] else "none", ""),
        ("leader CPU (keepalives)", f"{k['leader_cores']:.2f} cores, {k['leader_cpu_us_per_keepalive']:.0f} µs/op "
         f"(~{1e6 / max(1e-9, k['leader_cpu_us_per_keepalive']):,.0f}/s per leader core)", ""),
        ("driver CPU", f"{k['driver_cores']:.2f} cores ({saturated}), {k['driver_cpu_us_per_keepalive']:.0f} µs/op",
         ""),
        ("other machine CPU", f"{k['other_cores']:.2f} cores (of {os.cpu_count()})", ""),
        ("leader memory / lease", per_lease(leader),
         f"< {TARGET_BYTES_PER_LEASE} B: {ok(lead_mem['rss_bytes_per_lease'] < TARGET_BYTES_PER_LEASE)}"),
    ]
    for nid in followers:
        rows.append((f"follower {nid} memory / lease", per_lease(nid), ""))
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
    parser.add_argument("--concurrency", type=int, default=256, help="keepalives in flight")
    parser.add_argument("--grant-concurrency", type=int, default=512, help="grants in flight")
    parser.add_argument("--connections", type=int, default=8, help="client connections to the leader")
    parser.add_argument("--quick", action="store_true", help="10k leases, 3 s")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--keep-data", action="store_true", help="keep the nodes' data dirs and logs")
    args = parser.parse_args()
    if args.quick:
        args.leases, args.duration = 10_000, 3.0
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
    result.update(loadavg_before=before, loadavg_after=loadavg(), cpus=os.cpu_count(),
                  started=time.strftime("%Y-%m-%dT%H:%M:%S"))
    md = table(result)
    print(md)
    (out / "leases.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "leases.md").write_text(md + "\n")
    print(f"\nwrote {out / 'leases.json'}" + (f"; node data in {cluster.root}" if args.keep_data else ""))


if __name__ == "__main__":
    main()
