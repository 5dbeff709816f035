"""Scale runs, raft-registry and etcd side by side: many instances with leases, many watchers.

    python -m bench.scale [--quick] [--out DIR] [--instances N] [--watchers W] [--systems ours,etcd]
    python -m bench.compare --scale [...]        # the same

For each system, on a fresh three-node cluster (as in compare.py, like with like: etcd's data on tmpfs,
ours with ``--unsafe-no-fsync``):

1. registers ``--instances`` instances (default 100k), each with its own lease (TTL 600 s): ours
   ``lease_grant`` + ``register(lease=...)``, etcd ``lease/grant`` + ``kv/put`` with the lease, 256 in
   flight; reports instances/s and the leader's (and followers') RSS growth per instance
   (``/proc/PID/status``, as ``leases.py`` does: an upper bound, it includes the request-id table, the
   event history and the uncompacted log the writes filled);
2. takes an online snapshot (ours: the ``snapshot_save`` stream, as ``regctl snapshot save``; etcd:
   ``etcdctl snapshot save``): seconds and bytes;
3. restarts every node (SIGTERM, start on the same data) and times until a leader serves linearizable
   reads, then checks the data came back (ours: every node's revision; etcd: the key count);
4. opens ``--watchers`` idle watches (default 10k) of one service on one follower and reports that
   node's RSS growth per watcher (etcd through the gateway: one HTTP connection and one gateway
   stream per watch, so its number includes a connection's cost; ours multiplexes 500 watches a
   connection).

Writes DIR/scale.json and DIR/scale.md (default ``bench/results/scale-<timestamp>``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvloop

from bench import etcdload
from bench.etcdcluster import EtcdCluster, ensure_etcd, ensure_etcdctl
from bench.leases import loadavg, log, proc_memory
from bench.localcluster import BenchCluster, LoadTarget
from bench.run import server_args

BENCH_DIR = Path(__file__).resolve().parent

from registry.client import Client  # noqa: E402

TTL_S = 600
SERVICES = 1000
IN_FLIGHT = 256
WATCHES_PER_CLIENT = 500


async def _in_parallel(total: int, width: int, one: Callable[[int, int], Awaitable[None]]) -> float:
    """Run one(worker, i) for i in range(total) with ``width`` workers; return the seconds it took."""
    items = iter(range(total))

    async def worker(w: int) -> None:
        for i in items:
            await one(w, i)
            if (i + 1) % 20_000 == 0:
                log(f"{i + 1:,} done")

    began = time.monotonic()
    await asyncio.gather(*(worker(w) for w in range(width)))
    return time.monotonic() - began


async def populate(system: str, endpoint: str, total: int) -> float:
    """``total`` instances, each on its own lease; seconds taken."""
    if system == "etcd":
        conns = await etcdload.connect([endpoint], IN_FLIGHT)

        async def one_etcd(w: int, i: int) -> None:
            lease = await etcdload.lease_grant(conns[w], TTL_S)
            record = {"service": f"scale-{i % SERVICES}", "id": f"i{i}", "address": "10.0.0.1",
                      "port": 8000 + i % 1000, "meta": {"zone": "a"}, "tags": ["scale"], "status": "passing"}
            await etcdload.put_json(conns[w], f"/scale/scale-{i % SERVICES}/i{i}", record, lease=lease)

        try:
            return await _in_parallel(total, IN_FLIGHT, one_etcd)
        finally:
            for conn in conns:
                await conn.close()
    clients = [Client([endpoint], timeout_s=30.0, client_name=f"scale-{j}") for j in range(8)]

    async def one_ours(w: int, i: int) -> None:
        client = clients[w % len(clients)]
        lease = await client.lease_grant(TTL_S * 1000)
        await client.register(f"scale-{i % SERVICES}", f"i{i}", "10.0.0.1", 8000 + i % 1000,
                              meta={"zone": "a"}, tags=["scale"], lease=lease)

    try:
        return await _in_parallel(total, IN_FLIGHT, one_ours)
    finally:
        for client in clients:
            await client.close()


async def snapshot(system: str, endpoint: str, workdir: Path) -> dict[str, Any]:
    began = time.monotonic()
    if system == "etcd":
        etcdctl = ensure_etcdctl(install=False)  # main() made sure of it before any work
        path = workdir / "etcd.snapshot"
        done = await asyncio.to_thread(
            subprocess.run, [etcdctl, "--endpoints", f"http://{endpoint}", "snapshot", "save", str(path)],
            env={**os.environ, "ETCDCTL_API": "3"}, capture_output=True, text=True)
        if done.returncode != 0:
            return {"error": done.stderr.strip()[-300:]}
        size = path.stat().st_size
        path.unlink()
        return {"seconds": time.monotonic() - began, "bytes": size, "how": "etcdctl snapshot save"}
    size = 0
    async with Client([endpoint], timeout_s=300.0) as client:
        async for item in client.stream("snapshot_save", {}):
            if item.get("type") == "chunk":
                size += len(item["data"])
    return {"seconds": time.monotonic() - began, "bytes": size, "how": "snapshot_save stream (regctl snapshot save)"}


def state_check(system: str, cluster: LoadTarget) -> dict[str, Any]:
    """What the restart must bring back: every node's revision (ours), the key count (etcd)."""
    if system == "etcd":
        assert isinstance(cluster, EtcdCluster)
        prefix = b"/scale/"
        out = cluster.post(cluster.endpoints[0], "/v3/kv/range",
                           {"key": etcdload.b64(prefix), "range_end": etcdload.b64(etcdload.prefix_end(prefix)),
                            "count_only": True}, timeout_s=30.0)
        return {"keys": int(str(out.get("count", 0)))}
    assert isinstance(cluster, BenchCluster)
    return {"revisions": sorted({int(str(st.get("revision"))) for st in cluster.statuses() if st.get("reachable")})}


async def open_watchers(system: str, endpoint: str, count: int) -> Callable[[], Awaitable[None]]:
    """``count`` idle watches on ``endpoint``, all confirmed created; returns their closer."""
    created = asyncio.Event()
    seen = [0]

    def one_created() -> None:
        seen[0] += 1
        if seen[0] == count:
            created.set()

    conns: list[Any]
    if system == "etcd":
        # One connection per watch: see watch.py (the gateway loses creates sent after its first response).
        conns = await etcdload.connect([endpoint], count)

        async def run(i: int) -> None:
            async for kind, _ in etcdload.watch_timestamps(conns[i], "/scale-watch/"):
                if kind == "created":
                    one_created()
    else:
        conns = [Client([endpoint], timeout_s=30.0, client_name=f"scale-watch-{j}")
                 for j in range(math.ceil(count / WATCHES_PER_CLIENT))]

        async def run(i: int) -> None:
            async for item in conns[i % len(conns)].watch(service="scale-watch"):
                if item.get("type") == "created":
                    one_created()

    tasks = [asyncio.create_task(run(i)) for i in range(count)]
    await asyncio.wait_for(created.wait(), 300.0)

    async def close() -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for conn in conns:
            with contextlib.suppress(Exception):
                await conn.close()

    return close


def _rss(cluster: LoadTarget) -> dict[str, int]:
    return {n.node_id: proc_memory(n.pid)["VmRSS"] for n in cluster.nodes}


async def measure(system: str, cluster: LoadTarget, instances: int, watchers: int, workdir: Path) -> dict[str, Any]:
    # The clusters' helpers are synchronous (their own loop, for ours): off this loop, in a thread.
    leader = await asyncio.to_thread(cluster.leader)
    assert leader is not None
    api = cluster.node(leader).api
    await asyncio.sleep(1.0)  # let start-up settle before the baseline
    before = _rss(cluster)
    log(f"{system}: {instances:,} instances with leases")
    seconds = await populate(system, api, instances)
    await asyncio.sleep(2.0)  # followers finish applying
    after = _rss(cluster)
    memory = {nid: {"rss_before": before[nid], "rss_after": after[nid],
                    "bytes_per_instance": (after[nid] - before[nid]) / instances,
                    "role": "leader" if nid == leader else "follower"} for nid in before}
    log(f"{system}: snapshot")
    snap = await snapshot(system, api, workdir)
    check_before = await asyncio.to_thread(state_check, system, cluster)
    log(f"{system}: restart")
    assert isinstance(cluster, BenchCluster | EtcdCluster)
    restart_s = await asyncio.to_thread(cluster.restart)
    check_after = await asyncio.to_thread(state_check, system, cluster)
    leader = await asyncio.to_thread(cluster.leader) or leader
    follower = next(n for n in cluster.nodes if n.node_id != leader)
    log(f"{system}: {watchers:,} watchers on {follower.node_id}")
    await asyncio.sleep(1.0)
    w_before = proc_memory(follower.pid)["VmRSS"]
    began = time.monotonic()
    close = await open_watchers(system, follower.api, watchers)
    open_s = time.monotonic() - began
    await asyncio.sleep(1.0)
    w_after = proc_memory(follower.pid)["VmRSS"]
    await close()
    return {
        "instances": instances, "populate_s": seconds, "instances_per_s": instances / seconds,
        "memory": memory, "leader": leader,
        "leader_bytes_per_instance": next(m["bytes_per_instance"] for m in memory.values() if m["role"] == "leader"),
        "snapshot": snap, "restart_s": restart_s, "state_before_restart": check_before,
        "state_after_restart": check_after, "state_restored": check_before == check_after,
        "watchers": watchers, "watch_open_s": open_s, "watch_node": follower.node_id,
        "watch_rss_before": w_before, "watch_rss_after": w_after,
        "bytes_per_watcher": (w_after - w_before) / watchers,
    }


def table(results: dict[str, dict[str, Any]]) -> str:
    names = {"ours": "raft-registry", "etcd": "etcd (tmpfs)"}
    systems = list(results)

    def cell(system: str, fmt: Callable[[dict[str, Any]], str]) -> str:
        try:
            return fmt(results[system])
        except (KeyError, TypeError):
            return "-"

    rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("instances with leases", lambda r: f"{r['instances']:,}"),
        ("lease + register rate", lambda r: f"{r['instances_per_s']:,.0f} instances/s"),
        ("leader RSS per instance", lambda r: f"{r['leader_bytes_per_instance']:,.0f} B"),
        ("followers' RSS per instance", lambda r: ", ".join(
            f"{m['bytes_per_instance']:,.0f} B" for m in r["memory"].values() if m["role"] == "follower")),
        ("online snapshot", lambda r: f"{r['snapshot']['bytes'] / 1e6:,.1f} MB in {r['snapshot']['seconds']:.2f} s"),
        ("restart (all nodes) to serving", lambda r: f"{r['restart_s']:.1f} s"),
        ("state after restart", lambda r: "same" if r["state_restored"] else
         f"DIFFERENT: {r['state_before_restart']} -> {r['state_after_restart']}"),
        ("idle watchers on one follower", lambda r: f"{r['watchers']:,} (opened in {r['watch_open_s']:.1f} s)"),
        ("follower RSS per watcher", lambda r: f"{r['bytes_per_watcher']:,.0f} B"),
    ]
    lines = ["| measure | " + " | ".join(names.get(s, s) for s in systems) + " |",
             "|---|" + "---:|" * len(systems)]
    for label, fmt in rows:
        lines.append(f"| {label} | " + " | ".join(cell(s, fmt) for s in systems) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=None, help="instances with leases (default 100,000)")
    parser.add_argument("--watchers", type=int, default=None, help="idle watchers (default 10,000)")
    parser.add_argument("--quick", action="store_true", help="10,000 instances, 1,000 watchers")
    parser.add_argument("--systems", default="ours,etcd", help="comma-separated: ours, etcd")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    instances = args.instances or (10_000 if args.quick else 100_000)
    watchers = args.watchers or (1_000 if args.quick else 10_000)
    systems = [s for s in args.systems.split(",") if s]
    if not set(systems) <= {"ours", "etcd"}:
        parser.error("--systems: ours and/or etcd")
    out_dir: Path = args.out or BENCH_DIR / "results" / time.strftime("scale-%Y%m%d-%H%M%S")
    results: dict[str, dict[str, Any]] = {}
    load_before = loadavg()
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the clusters are stopped below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if "etcd" in systems:
        # Before minutes of work, not after: etcd's snapshot needs etcdctl (its own Debian package).
        try:
            ensure_etcd()
            ensure_etcdctl()
        except RuntimeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    uvloop.install()
    for system in systems:
        cluster: BenchCluster | EtcdCluster = (BenchCluster(extra_args=server_args(fsync=False)) if system == "ours"
                                               else EtcdCluster(durable=False))
        workdir = Path(tempfile.mkdtemp(prefix="scalebench-"))
        try:
            cluster.start()
            results[system] = asyncio.run(measure(system, cluster, instances, watchers, workdir))
        except KeyboardInterrupt:
            print("interrupted; stopping the cluster", file=sys.stderr)
            return 130
        finally:
            cluster.stop()
            shutil.rmtree(workdir, ignore_errors=True)
    md = table(results)
    meta = {"cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": loadavg(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "ttl_s": TTL_S, "in_flight": IN_FLIGHT}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "scale.json").write_text(json.dumps({"meta": meta, "systems": results}, indent=2) + "\n")
    (out_dir / "scale.md").write_text(md + "\n")
    print(md)
    print(f"\nwrote {out_dir / 'scale.json'}, {out_dir / 'scale.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
