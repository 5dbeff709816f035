"""Watch benchmark: events delivered per second and commit-to-client latency with W watchers on one node.

Starts a fresh three-node cluster (``localcluster.BenchCluster``), then for each W in ``--watchers``:

* watcher driver process(es) (``--drivers``, default 1) open W watches of one service on ONE follower,
  ``ceil(W / 500)`` ``Client`` connections per driver (streams are multiplexed; a connection takes at
  most 1024 open requests), and wait until every watch has said ``created``;
* a writer process registers instances of that service as fast as it can at ``--concurrency``
  (default 64) for ``--duration`` seconds, against the leader, with its send time (``time.time()``)
  in the instance meta;
* each watcher computes latency = receive time - send time for every event (an upper bound on
  commit-to-client latency: it includes the write's own commit), into a 0.1 ms histogram.

Reported per W: writes/s, events delivered/s (sum over watchers, received inside the write window),
p50/p99/max delivery latency (all events, including those drained up to ``--drain`` s after
the window; events never delivered are not in it, so check *delivered by end of drain*),
follower node CPU cores, all-nodes CPU cores, watcher-driver and writer CPU cores, and
/proc/loadavg before each round.  Only 127.0.0.1 is contacted.

    python -m bench.watch --quick            # 3 s per W
    python -m bench.watch --duration 10 --watchers 1,100,1000 --drivers 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing as mp
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any

import uvloop

from bench import etcdload
from bench.httpclient import HttpConnection
from bench.loadgen import closed_loop, etcd_error_code, registry_error_code
from bench.localcluster import BenchCluster, LoadTarget, cpu_seconds, machine_busy_seconds
from registry.client import Client

#: Latency histogram: bins of 0.1 ms up to 60 s (the last bin holds everything above).
BIN_S = 1e-4
BINS = 600_000
WATCHES_PER_CLIENT = 500
INSTANCE_IDS = 4096


# -- watcher driver ----------------------------------------------------------


#: The last events list whose send times were read, and those times.  The client hands every watch
#: on a connection the same decoded item when the node sent them the same bytes (all watches here
#: watch one service), so the times are read once per item, not once per watcher.
_last_stamps: list[Any] = [None, []]


async def _registry_stream(client: Client, service: str) -> AsyncIterator[tuple[str, list[float | None]]]:
    """Our watch of ``service`` as (kind, send times of the events' writes), like ``etcdload.watch_timestamps``."""
    async for item in client.watch(service=service, progress_ms=1000):
        kind = item.get("type")
        if kind == "events":
            events = item["events"]
            if events is _last_stamps[0]:
                yield "events", _last_stamps[1]
                continue
            stamps: list[float | None] = []
            for event in events:
                ts = ((event.get("after") or {}).get("meta") or {}).get("ts")
                stamps.append(None if ts is None else float(ts))
            _last_stamps[0], _last_stamps[1] = events, stamps
            yield "events", stamps
        elif kind in ("created", "snapshot"):
            yield str(kind), []


async def _watchers(system: str, endpoint: str, service: str, count: int, ready: MpEvent, start_at: Any,
                    go: MpEvent, window_s: float, drain_s: float) -> dict[str, Any]:
    hist = [0] * (BINS + 1)
    state = {"in_window": 0, "total": 0, "no_ts": 0, "snapshots": 0, "created": 0}
    window = [math.inf, math.inf]  # wall-clock start and end of the write window, set on go
    created = asyncio.Event()
    streams: list[AsyncIterator[tuple[str, list[float | None]]]]
    conns: list[Client] | list[HttpConnection]
    if system == "etcd":
        # HTTP/1.1: one connection per watch. The gateway could carry several watches on one stream, but
        # Go's HTTP/1 server stops reading a request body once the response has begun, so creates sent
        # after the first response are lost (measured: ~100 of 500 got through).
        conns = await etcdload.connect([endpoint], count)
        nclients = count
        streams = [etcdload.watch_timestamps(conns[i], f"/bench/{service}/") for i in range(count)]
    else:
        nclients = max(1, math.ceil(count / WATCHES_PER_CLIENT))
        conns = [Client([endpoint], timeout_s=10.0, client_name=f"watch-bench-{j}") for j in range(nclients)]
        streams = [_registry_stream(conns[i % nclients], service) for i in range(count)]

    async def one(stream: AsyncIterator[tuple[str, list[float | None]]]) -> None:
        clock = time.time
        async for kind, stamps in stream:
            if kind == "events":
                now = clock()
                n = len(stamps)
                state["total"] += n
                if window[0] <= now <= window[1]:
                    state["in_window"] += n
                for ts in stamps:
                    if ts is None:
                        state["no_ts"] += 1
                        continue
                    b = int((now - ts) / BIN_S)
                    hist[b if 0 <= b < BINS else (BINS if b >= BINS else 0)] += 1
            elif kind == "created":
                state["created"] += 1
                if state["created"] == count:
                    created.set()
            elif kind == "snapshot":
                state["snapshots"] += 1

    tasks = [asyncio.create_task(one(stream)) for stream in streams]
    await asyncio.wait_for(created.wait(), 60.0)
    loop = asyncio.get_running_loop()
    ready.set()
    await loop.run_in_executor(None, go.wait)
    window[0] = start_at.value
    window[1] = start_at.value + window_s
    await asyncio.sleep(max(0.0, window[1] + drain_s - time.time()))
    for task in tasks:
        task.cancel()
    # Bounded: a watch that ignored its cancellation (the client bug behind the hung runs, see
    # bench/README.md) is reported instead of waited for forever.
    _, stuck = await asyncio.wait(tasks, timeout=30.0)
    if stuck:
        raise RuntimeError(f"{len(stuck)} of {len(tasks)} watches did not end when cancelled")
    for conn in conns:
        with contextlib.suppress(Exception):
            await conn.close()
    return {**state, "clients": nclients, "hist": {i: c for i, c in enumerate(hist) if c}}


def watcher_main(system: str, endpoint: str, service: str, count: int, ready: MpEvent, start_at: Any, go: MpEvent,
                 window_s: float, drain_s: float, out: Any) -> None:
    uvloop.install()
    try:
        out.put(asyncio.run(_watchers(system, endpoint, service, count, ready, start_at, go, window_s, drain_s)))
    except BaseException as err:  # the parent must hear back either way
        out.put({"error": repr(err)})
        raise


# -- writer --------------------------------------------------------------------


async def _writer(system: str, endpoint: str, service: str, concurrency: int, ready: MpEvent, start_at: Any,
                  go: MpEvent, window_s: float, rate: float = 0.0) -> dict[str, Any]:
    op: Callable[[Any, int], Awaitable[Any]]
    conns: list[Client] | list[HttpConnection]
    if system == "etcd":
        conns = await etcdload.connect([endpoint], concurrency)

        async def op(conn: Any, n: int) -> Any:
            value = {"address": "10.0.0.1", "port": 8000 + n % 1000, "ts": repr(time.time())}
            return await etcdload.put_json(conn, f"/bench/{service}/i{n % INSTANCE_IDS}", value)

        error_code = etcd_error_code
    else:
        nclients = max(1, math.ceil(concurrency / 64))
        clients = [Client([endpoint], timeout_s=10.0, client_name=f"watch-writer-{j}") for j in range(nclients)]
        for client in clients:
            await client.call("status", {})
        conns = clients

        async def op(conn: Any, n: int) -> Any:
            return await conn.register(service, f"i{n % INSTANCE_IDS}", "10.0.0.1", 8000 + n % 1000,
                                       meta={"ts": repr(time.time())})

        error_code = registry_error_code
    ready.set()
    await asyncio.get_running_loop().run_in_executor(None, go.wait)
    # The window is given in wall-clock time (the watchers compare send and receive times across processes).
    start_mono = time.monotonic() + (start_at.value - time.time())
    if rate > 0:
        unpaced = op

        async def op(conn: Any, n: int) -> Any:
            # Write n is sent no earlier than start + n / rate: a steady load the watchers can keep up
            # with, so the latency percentiles measure delivery rather than a growing backlog.
            delay = start_mono + n / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            return await unpaced(conn, n)
    await asyncio.sleep(max(0.0, start_mono - time.monotonic()))
    latencies, errors = await closed_loop(op, conns, concurrency, start_mono, start_mono + window_s,
                                          iter(range(1 << 62)), error_code)
    for conn in conns:
        await conn.close()
    return {"writes": len(latencies), "errors": dict(errors)}


def writer_main(system: str, endpoint: str, service: str, concurrency: int, ready: MpEvent, start_at: Any,
                go: MpEvent, window_s: float, out: Any, rate: float = 0.0) -> None:
    uvloop.install()
    try:
        out.put(asyncio.run(_writer(system, endpoint, service, concurrency, ready, start_at, go, window_s, rate)))
    except BaseException as err:  # the parent must hear back either way
        out.put({"error": repr(err)})
        raise


# -- orchestration ---------------------------------------------------------------


def _percentile(hist: dict[int, int], q: float) -> float:
    total = sum(hist.values())
    if total == 0:
        return math.nan
    rank = q * total
    seen = 0
    for b in sorted(hist):
        seen += hist[b]
        if seen >= rank:
            return (b + 0.5) * BIN_S * 1e3
    return max(hist) * BIN_S * 1e3


def run_round(cluster: LoadTarget, leader: str, follower: str, watchers: int, drivers: int, concurrency: int,
              duration_s: float, drain_s: float, system: str = "registry", rate: float = 0.0) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    service = f"watch-bench-w{watchers}-{int(time.time() * 1000)}"
    fnode, lnode = cluster.node(follower), cluster.node(leader)
    out: Any = ctx.Queue()
    go = ctx.Event()
    start_at = ctx.Value("d", 0.0)
    counts = [watchers // drivers + (1 if i < watchers % drivers else 0) for i in range(drivers)]
    counts = [c for c in counts if c > 0]
    readies = [ctx.Event() for _ in counts]
    procs = [ctx.Process(target=watcher_main,
                         args=(system, fnode.api, service, c, r, start_at, go, duration_s, drain_s, out))
             for c, r in zip(counts, readies, strict=True)]
    # The writer connects while the watchers do, and waits for `go` too: the window opens only once
    # every process is ready (starting a process can take longer than a short window on a busy box).
    writer_ready = ctx.Event()
    writer = ctx.Process(target=writer_main,
                         args=(system, lnode.api, service, concurrency, writer_ready, start_at, go, duration_s, out,
                               rate))
    for p in [*procs, writer]:
        p.start()
    for r in [*readies, writer_ready]:
        if not r.wait(90.0):
            for p in [*procs, writer]:  # they would wait for `go` forever
                p.kill()
                p.join(5)
            raise RuntimeError("watchers or writer not ready in 90 s")
    loadavg = Path("/proc/loadavg").read_text().split()[:3]
    begin = time.time() + 0.2
    start_at.value = begin
    go.set()
    time.sleep(max(0.0, begin - time.time()))
    cpu0 = cluster.cpu_seconds()
    drv0 = [cpu_seconds(p.pid or 0) for p in procs]
    wr0 = cpu_seconds(writer.pid or 0)
    busy0 = machine_busy_seconds()
    time.sleep(max(0.0, begin + duration_s - time.time()))
    cpu1 = cluster.cpu_seconds()
    drv1 = [cpu_seconds(p.pid or 0) for p in procs]
    wr1 = cpu_seconds(writer.pid or 0)
    busy1 = machine_busy_seconds()
    try:
        results = [out.get(timeout=duration_s + drain_s + 60) for _ in range(len(procs) + 1)]
    finally:
        for p in [*procs, writer]:
            if p.is_alive():
                p.join(5)
            if p.is_alive():
                p.kill()
    failed = [r["error"] for r in results if "error" in r]
    if failed:
        raise RuntimeError(f"watch driver failed: {failed}")
    for p in [*procs, writer]:
        p.join(10)
    wres = next(r for r in results if "writes" in r)
    wlist = [r for r in results if "writes" not in r]
    hist: dict[int, int] = {}
    for r in wlist:
        for b, c in r["hist"].items():
            hist[int(b)] = hist.get(int(b), 0) + c
    node_cpu = {k: (cpu1[k] - cpu0[k]) / duration_s for k in cpu0}
    drv_cores = sum(b - a for a, b in zip(drv0, drv1, strict=True)) / duration_s
    wr_cores = (wr1 - wr0) / duration_s
    in_window = sum(r["in_window"] for r in wlist)
    total = sum(r["total"] for r in wlist)
    writes = wres["writes"]
    return {
        "watchers": watchers,
        "driver_processes": len(procs),
        "clients_per_driver": [r["clients"] for r in wlist],
        "duration_s": duration_s,
        "writes": writes,
        "writes_per_s": writes / duration_s,
        "write_errors": wres["errors"],
        "events_in_window": in_window,
        "events_total": total,
        "events_expected_min": writes * watchers,
        "events_per_s": in_window / duration_s,
        #: Share of the events for the window's writes that reached the watchers by the end of the drain.
        "delivered_fraction": total / (writes * watchers) if writes else math.nan,
        "events_without_ts": sum(r["no_ts"] for r in wlist),
        "resync_snapshots": sum(r["snapshots"] for r in wlist),
        "latency_p50_ms": _percentile(hist, 0.50),
        "latency_p99_ms": _percentile(hist, 0.99),
        "latency_max_ms": (max(hist) + 1) * BIN_S * 1e3 if hist else math.nan,
        "latency_samples": sum(hist.values()),
        "follower_node": follower,
        "follower_cores": node_cpu[follower],
        #: The watchers' node's CPU per event delivered in the window (less noise-sensitive than events/s).
        "follower_us_per_event": node_cpu[follower] * duration_s / in_window * 1e6 if in_window else math.nan,
        "leader_cores": node_cpu[leader],
        "all_nodes_cores": sum(node_cpu.values()),
        "watch_driver_cores": drv_cores,
        "writer_cores": wr_cores,
        "machine_busy_cores": (busy1 - busy0) / duration_s,
        "loadavg_before": loadavg,
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| W | writes/s | events/s delivered | delivered by end of drain | p50 ms | p99 ms | max ms "
            "| follower cores | follower µs/event | all nodes cores | watch driver cores | writer cores "
            "| machine busy cores "
            "| loadavg before | target |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        target = ""
        if r["watchers"] == 1000:
            ok = r["events_per_s"] >= 100_000 and r["latency_p99_ms"] < 100
            target = "met" if ok else "missed (>=100k ev/s, p99 <100 ms)"
        lines.append(
            f"| {r['watchers']} | {r['writes_per_s']:,.0f} | {r['events_per_s']:,.0f} | {r['delivered_fraction']:.0%} "
            f"| {r['latency_p50_ms']:.1f} "
            f"| {r['latency_p99_ms']:.1f} | {r['latency_max_ms']:.0f} | {r['follower_cores']:.2f} "
            f"| {r.get('follower_us_per_event', math.nan):.1f} "
            f"| {r['all_nodes_cores']:.2f} | {r['watch_driver_cores']:.2f} | {r['writer_cores']:.2f} "
            f"| {r['machine_busy_cores']:.2f} | {' '.join(r['loadavg_before'])} | {target} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--watchers", default="1,100,1000", help="comma-separated W values")
    parser.add_argument("--duration", type=float, default=10.0, help="write window per W, seconds")
    parser.add_argument("--quick", action="store_true", help="3 s per W")
    parser.add_argument("--concurrency", type=int, default=64, help="writes in flight")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="writes per second in total (0: as fast as the cluster takes them)")
    parser.add_argument("--drivers", type=int, default=1, help="watcher driver processes")
    parser.add_argument("--drain", type=float, default=2.0, help="seconds watchers keep reading after the window")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    duration = 3.0 if args.quick else args.duration
    out_dir = args.out or Path(__file__).resolve().parent / "results" / f"watch-{time.strftime('%Y%m%d-%H%M%S')}"
    ws = [int(w) for w in args.watchers.split(",") if w]
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the cluster is stopped below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cluster = BenchCluster()
    rows: list[dict[str, Any]] = []
    try:
        leader = cluster.start()
        follower = next(n.node_id for n in cluster.nodes if n.node_id != leader)
        print(f"cluster up: leader {leader}, watchers on follower {follower} ({os.cpu_count()} CPUs)", flush=True)
        for w in ws:
            cluster.check_alive()
            row = run_round(cluster, leader, follower, w, min(args.drivers, w), args.concurrency, duration,
                            args.drain, rate=args.rate)
            rows.append(row)
            print(f"W={w}: {row['writes_per_s']:,.0f} writes/s, {row['events_per_s']:,.0f} events/s, "
                  f"p50 {row['latency_p50_ms']:.1f} ms, p99 {row['latency_p99_ms']:.1f} ms", flush=True)
    finally:
        cluster.stop()
    md = table(rows)
    print()
    print(md)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"cpus": os.cpu_count(), "duration_s": duration, "concurrency": args.concurrency,
            "drivers": args.drivers, "drain_s": args.drain, "rate": args.rate}
    (out_dir / "watch.json").write_text(json.dumps({"config": meta, "rows": rows}, indent=2))
    (out_dir / "watch.md").write_text(md + "\n")
    print(f"\nwrote {out_dir / 'watch.json'}")


if __name__ == "__main__":
    main()
