"""Benchmark a fresh local three-node raft-registry cluster.

    python -m bench.run [--quick] [--out DIR] [--duration S] [--repeats N] [--drivers N]
                        [--workloads register:256,get_linearizable:256] [--profile]
    python -m bench.compare [--quick] ...   # side by side with etcd

Starts three real ``regctl server`` processes (cluster key, temp data dir,
free loopback ports), then for each workload runs driver processes
(``bench.loadgen``, uvloop, ``min(concurrency, 8)`` client connections spread
over the nodes) for the same duration, N times, and reports medians:
throughput, p50/p99/p99.9 latency, and server CPU per op (the three server
processes' utime+stime deltas from /proc over the measurement window,
divided by the ops completed in it).  Writes DIR/results.json and
DIR/results.md and prints the table.  Everything runs on 127.0.0.1; every
process started here is stopped on exit, on error and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Collection
from pathlib import Path
from types import FrameType
from typing import Any

from bench.loadgen import READ_SERVICE, WORKLOADS, DriverSpec
from bench.localcluster import BenchCluster, LoadTarget, cpu_seconds, machine_busy_seconds
from registry.client import SyncClient
from registry.raft import PYSYNCOBJ_VERSION

BENCH_DIR = Path(__file__).resolve().parent

#: What an acknowledged write survives in each mode (``--unsafe-no-fsync`` or not).
DURABILITY_FSYNC = (
    "Raft log fsynced (one grouped fdatasync per Raft tick) before any node sends a message that relies on "
    "it: an acknowledged write is on the disk of a majority and survives a power loss of every node."
)
DURABILITY_NO_FSYNC = (
    "--unsafe-no-fsync: the Raft log is written but never fsynced. Acknowledged writes survive kill -9 of "
    "all nodes (the page cache outlives the processes), not a power loss or kernel crash of a majority."
)


def durability(fsync: bool) -> str:
    return DURABILITY_FSYNC if fsync else DURABILITY_NO_FSYNC


def server_args(fsync: bool, acl: bool = False) -> tuple[str, ...]:
    """The ``regctl server`` options of a bench cluster in that mode."""
    return (() if fsync else ("--unsafe-no-fsync",)) + (("--acl",) if acl else ())

#: (workload, concurrency) in run order.
DEFAULT_PLAN: list[tuple[str, int]] = [
    ("register", 1),
    ("register", 16),
    ("register", 256),
    ("register", 1024),
    ("get_linearizable", 256),
    ("get_stale", 256),
]

#: Targets from the performance issue: (metric, "<=" or ">=", value).
TARGETS: dict[tuple[str, int], tuple[str, str, float]] = {
    ("register", 1): ("p50_ms", "<=", 1.5),
    ("register", 16): ("p99_ms", "<=", 19.0),
    ("register", 256): ("ops_per_s", ">=", 12_000.0),
    ("get_linearizable", 256): ("ops_per_s", ">=", 12_000.0),
}

CLIENTS_MAX = 8
#: Load runs this long before the measurement window opens.
WARMUP_S = 1.0
_MEDIAN_KEYS = ("ops_per_s", "p50_ms", "p99_ms", "p999_ms", "cpu_ms_per_op", "server_cores", "driver_cores",
                "other_cores", "fsyncs_per_s", "ops_per_fsync")

_live: list[subprocess.Popen[bytes]] = []


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def percentile(sorted_values: list[int], q: float) -> float:
    """Nearest-rank percentile of already sorted values (0 if none)."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), int(-(-q * len(sorted_values) // 1))))
    return float(sorted_values[rank - 1])


def kill_live() -> None:
    """Kill every driver and profiler process this module started that is still running (cleanup)."""
    for proc in list(_live):
        kill_process(proc)


def kill_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def _spawn_drivers(cluster: LoadTarget, workload: str, concurrency: int, duration_s: float,
                   drivers: int, leader: str | None, extra: dict[str, Any] | None = None,
                   ) -> list[tuple[subprocess.Popen[bytes], Path]]:
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    drivers = max(1, min(drivers, concurrency))
    clients_total = min(concurrency, CLIENTS_MAX)
    ids = [n.node_id for n in cluster.nodes]
    first_node = ids.index(leader) if leader in ids else 0
    for d in range(drivers):
        share = concurrency // drivers + (1 if d < concurrency % drivers else 0)
        spec: DriverSpec = {
            "endpoints": cluster.endpoints, "workload": workload, "concurrency": share,
            "clients": max(1, min(share, clients_total // drivers)), "warmup_s": WARMUP_S,
            "duration_s": duration_s, "driver_index": d, "first_node": first_node,
            "result_path": str(cluster.root / f"driver-{d}.json"),
        }
        token = getattr(cluster, "token", None)
        if token is not None:
            spec["token"] = token
        if extra:
            spec.update(extra)  # type: ignore[typeddict-item]
            if "leases_file" in extra:  # one lease set per driver
                spec["leases_file"] = f"{extra['leases_file']}.{d}"
        proc = subprocess.Popen([sys.executable, "-m", "bench.loadgen", json.dumps(spec)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=BENCH_DIR.parent)
        _live.append(proc)
        procs.append((proc, Path(spec["result_path"])))
    return procs


def _start_profiler(pid: int, duration_s: float, out: Path) -> subprocess.Popen[bytes] | None:
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        print("warning: py-spy not found (pip install py-spy); no profile", file=sys.stderr)
        return None
    proc = subprocess.Popen(
        # --gil: sample only the thread holding the GIL, i.e. Python CPU time (threads waiting for the
        # GIL or blocked in poll would otherwise count as busy); native time is perf's job.
        [py_spy, "record", "--pid", str(pid), "--duration", str(max(1, round(duration_s))), "--rate", "250",
         "--nonblocking", "--gil", "--format", "raw", "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    _live.append(proc)
    return proc


def wait_quiet(max_cores: float, timeout_s: float) -> float:
    """Wait until the machine (our idle cluster included) is busy below ``max_cores``; return the last level."""
    deadline = time.monotonic() + timeout_s
    while True:
        before = machine_busy_seconds()
        time.sleep(1.0)
        busy = machine_busy_seconds() - before
        if busy <= max_cores or time.monotonic() >= deadline:
            if busy > max_cores:
                print(f"warning: machine still {busy:.2f} cores busy; measuring anyway", file=sys.stderr)
            return busy
        print(f"waiting for a quiet machine: {busy:.2f} cores busy (limit {max_cores:g})", file=sys.stderr)


def run_once(cluster: LoadTarget, workload: str, concurrency: int, duration_s: float, drivers: int,
             profile_to: Path | None = None, extra_spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """One measured run of ``workload`` against ``cluster`` (ours, or etcd with ``extra_spec={"system": "etcd"}``)."""
    leader_before = cluster.leader()
    spawned = _spawn_drivers(cluster, workload, concurrency, duration_s, drivers, leader_before, extra_spec)
    procs = [proc for proc, _ in spawned]
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if line.strip() != b"READY":
                raise RuntimeError(f"driver failed to start (exit {proc.wait()})")
        start = time.monotonic() + 0.05
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(f"{start!r}\n".encode())
            proc.stdin.flush()
        window_start = start + (extra_spec or {}).get("warmup_s", WARMUP_S)
        time.sleep(max(0.0, window_start - time.monotonic()))
        profiler = None
        if profile_to is not None and leader_before is not None:
            profiler = _start_profiler(cluster.node(leader_before).pid, duration_s, profile_to)
        wal_counts = getattr(cluster, "wal_counts", None)  # ours only: the Raft log's fsync counters
        wal0 = wal_counts() if wal_counts is not None else {}
        cpu0 = cluster.cpu_seconds()
        drv0 = [cpu_seconds(p.pid) for p in procs]
        busy0 = machine_busy_seconds()
        time.sleep(max(0.0, window_start + duration_s - time.monotonic()))
        busy1 = machine_busy_seconds()
        cpu1 = cluster.cpu_seconds()
        wal1 = wal_counts() if wal_counts is not None else {}
        drv1 = [cpu_seconds(p.pid) for p in procs]
        results = []
        for proc, result_path in spawned:
            proc.communicate(timeout=60)
            if proc.returncode != 0:
                raise RuntimeError(f"driver exited with code {proc.returncode}")
            results.append(json.loads(result_path.read_text()))
            result_path.unlink()
        if profiler is not None:
            profiler.wait(timeout=30)
    finally:
        for proc in procs:
            kill_process(proc)
            _live.remove(proc)
    cluster.check_alive()
    leader_after = cluster.leader()
    latencies = sorted(lat for r in results for lat in r["latency_us"])
    ops = len(latencies)
    errors: dict[str, int] = {}
    for r in results:
        for code, n in r["errors"].items():
            errors[code] = errors.get(code, 0) + n
    server_cpu = {node: cpu1[node] - cpu0[node] for node in cpu0}
    total_cpu = sum(server_cpu.values())
    driver_cpu = sum(b - a for a, b in zip(drv0, drv1, strict=True))
    return {
        "ops": ops,
        "ops_per_s": ops / duration_s,
        "p50_ms": percentile(latencies, 0.50) / 1000,
        "p99_ms": percentile(latencies, 0.99) / 1000,
        "p999_ms": percentile(latencies, 0.999) / 1000,
        "cpu_ms_per_op": total_cpu * 1000 / ops if ops else None,
        "server_cpu_s": {k: round(v, 3) for k, v in server_cpu.items()},
        "server_cores": total_cpu / duration_s,
        "driver_cores": driver_cpu / duration_s,
        # Whatever else ran on the machine meanwhile (kernel work for our sockets included).
        "other_cores": max(0.0, (busy1 - busy0) - total_cpu - driver_cpu) / duration_s,
        "drivers": len(procs),
        "errors": errors,
        "leader": leader_before,
        "leader_changed": leader_before != leader_after,
        **_fsync_figures(wal0, wal1, leader_before, ops, duration_s),
    }


def _fsync_figures(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]],
                   leader: str | None, ops: int, duration_s: float) -> dict[str, Any]:
    """The leader's fdatasyncs per second in the window, and client ops and log records per fdatasync.

    None where unknown (etcd, a node that did not answer /metrics, no fsync at all).
    """
    if leader is None or leader not in before or leader not in after:
        return {"fsyncs_per_s": None, "ops_per_fsync": None, "records_per_fsync": None}
    fsyncs = after[leader][0] - before[leader][0]
    records = after[leader][1] - before[leader][1]
    return {
        "fsyncs_per_s": fsyncs / duration_s,
        "ops_per_fsync": ops / fsyncs if fsyncs > 0 else None,
        "records_per_fsync": records / fsyncs if fsyncs > 0 else None,
    }


def summarize(workload: str, concurrency: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    row: dict[str, Any] = {"workload": workload, "concurrency": concurrency, "repeats": len(runs)}
    for key in _MEDIAN_KEYS:
        values = [r[key] for r in runs if r.get(key) is not None]
        row[key] = statistics.median(values) if values else None
    row["errors"] = sum(sum(r["errors"].values()) for r in runs)
    row["leader_changes"] = sum(1 for r in runs if r["leader_changed"])
    mark_target(row, TARGETS.get((workload, concurrency)))
    return row


def mark_target(row: dict[str, Any], target: tuple[str, str, float] | None) -> None:
    """Set row["target"] (text) and row["target_met"] for a (metric, "<=" or ">=", value) target, if any."""
    if target is None:
        return
    metric, cmp, value = target
    got = row[metric]
    row["target"] = f"{metric.replace('_', ' ')} {cmp} {value:g}"
    row["target_met"] = got is not None and (got <= value if cmp == "<=" else got >= value)


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    def num(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = [
        f"# raft-registry benchmark, {meta['started']}",
        "",
        f"- Cluster: 3 `regctl server` processes on 127.0.0.1, cluster key on (Raft traffic encrypted); "
        f"{meta['cpus']} CPU(s) shared by the cluster and the driver(s); Python {meta['python']}, "
        f"pysyncobj {meta['pysyncobj']}.",
        f"- Durability: {meta['durability']}",
        f"- ACLs: {'on (--acl; every request carries a management token)' if meta.get('acl') else 'off'}",
        f"- Each workload: {meta['duration_s']:g} s measured after {WARMUP_S:g} s warm-up, "
        f"{meta['repeats']} repeat(s), medians shown; {meta['drivers']} driver process(es), "
        f"min(concurrency, {CLIENTS_MAX}) client connections spread over the nodes.",
        "- CPU ms/op: utime+stime of the three server processes over the window / ops completed in it. "
        "Cores: CPU seconds per wall second (servers; driver; other = the rest of the machine's busy "
        "time in the window, i.e. anything else running on the host: keep it near 0 for clean numbers).",
        "- fsyncs/s: the leader's fdatasyncs of its Raft log in the window; ops/fsync: client ops completed "
        "per leader fdatasync (reads commit a barrier through the log too; keepalives never touch it).",
        "",
        "| workload | conc | ops/s | p50 ms | p99 ms | p99.9 ms | server CPU ms/op | server cores | "
        "driver cores | other cores | fsyncs/s | ops/fsync | errors | target |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        target = ""
        if "target" in r:
            target = f"{r['target']}: {'met' if r['target_met'] else 'MISSED'}"
        lines.append(
            f"| {r['workload']} | {r['concurrency']} | {num(r['ops_per_s'], ',.0f')} | {num(r['p50_ms'], '.2f')} | "
            f"{num(r['p99_ms'], '.2f')} | {num(r['p999_ms'], '.2f')} | {num(r['cpu_ms_per_op'], '.3f')} | "
            f"{num(r['server_cores'], '.2f')} | {num(r['driver_cores'], '.2f')} | {num(r['other_cores'], '.2f')} | "
            f"{num(r['fsyncs_per_s'], ',.0f')} | {num(r['ops_per_fsync'], '.1f')} | {r['errors']} | {target} |"
        )
    if any(r["leader_changes"] for r in rows):
        lines += ["", "WARNING: the leader changed during some runs; see results.json."]
    return "\n".join(lines) + "\n"


def parse_plan(text: str, names: Collection[str] = WORKLOADS, what: str = "CONCURRENCY") -> list[tuple[str, int]]:
    """``NAME:N,NAME:N`` -> [(NAME, N)], NAME in ``names``, N >= 1 (an argparse type)."""
    plan = []
    for item in text.split(","):
        name, _, conc = item.strip().partition(":")
        if name not in names or not conc.isdigit() or int(conc) < 1:
            raise argparse.ArgumentTypeError(f"workload must be NAME:{what} with NAME in {sorted(names)}")
        plan.append((name, int(conc)))
    return plan


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 s per workload, 1 repeat")
    parser.add_argument("--out", type=Path, default=None, help="output dir (default bench/results/<timestamp>)")
    parser.add_argument("--duration", type=float, default=None, help="seconds measured per run (default 5)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per workload (default 3)")
    parser.add_argument("--drivers", type=int, default=1, help="driver processes per run (default 1)")
    parser.add_argument("--workloads", type=parse_plan, default=DEFAULT_PLAN,
                        help="comma-separated NAME:CONCURRENCY (default: the full plan)")
    parser.add_argument("--profile", action="store_true",
                        help="after the measured runs, run each workload once more with py-spy on the leader "
                             "(collapsed stacks in DIR/profile-*.txt; not counted in the medians)")
    parser.add_argument("--keep-data", action="store_true", help="keep the cluster's temp data dir")
    parser.add_argument("--acl", action="store_true",
                        help="run the nodes with --acl (as docker-compose does), every request with a management "
                             "token")
    parser.add_argument("--unsafe-no-fsync", action="store_true",
                        help="run the nodes with --unsafe-no-fsync (the Raft log is never fsynced), to compare "
                             "with runs of systems whose data is on tmpfs; the default is the nodes' default, durable")
    parser.add_argument("--wait-quiet", type=float, default=None, metavar="CORES",
                        help="before each run, wait (up to --quiet-timeout s) until the machine is busy below "
                             "CORES (e.g. 0.2): for shared hosts")
    parser.add_argument("--quiet-timeout", type=float, default=120.0)
    args = parser.parse_args()
    duration_s = args.duration if args.duration is not None else (2.0 if args.quick else 5.0)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if duration_s <= 0 or repeats < 1:
        parser.error("--duration must be positive and --repeats at least 1")
    started = datetime.datetime.now()
    out_dir: Path = args.out or BENCH_DIR / "results" / started.strftime("%Y%m%d-%H%M%S")

    meta: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"), "cpus": os.cpu_count(),
        "python": platform.python_version(), "pysyncobj": PYSYNCOBJ_VERSION,
        "duration_s": duration_s, "warmup_s": WARMUP_S, "repeats": repeats, "drivers": args.drivers,
        "durability": durability(not args.unsafe_no_fsync), "fsync": not args.unsafe_no_fsync, "cluster_key": True,
        "acl": args.acl,
    }
    # Explicitly, also for SIGINT: a shell starting us in the background may have set it to "ignore".
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    cluster = BenchCluster(keep_data=args.keep_data, extra_args=server_args(not args.unsafe_no_fsync, args.acl))
    try:
        leader = cluster.start()
        print(f"cluster up: leader {leader}, endpoints {','.join(cluster.endpoints)}, data {cluster.root}",
              file=sys.stderr)
        with SyncClient(cluster.endpoints, timeout_s=10.0, token=cluster.token) as client:
            for i in range(3):
                client.register(READ_SERVICE, f"r{i}", "10.0.0.2", 9000 + i, meta={"zone": "a"}, tags=["bench"])
        runs: dict[tuple[str, int], list[dict[str, Any]]] = {key: [] for key in args.workloads}
        for rep in range(repeats):
            for workload, conc in args.workloads:
                if args.wait_quiet is not None:
                    wait_quiet(args.wait_quiet, args.quiet_timeout)
                run = run_once(cluster, workload, conc, duration_s, args.drivers)
                runs[(workload, conc)].append(run)
                print(f"[{rep + 1}/{repeats}] {workload:<17} c={conc:<5} {run['ops_per_s']:>9,.0f} ops/s  "
                      f"p50 {run['p50_ms']:.2f} ms  p99 {run['p99_ms']:.2f} ms  "
                      f"cpu {run['cpu_ms_per_op'] or 0:.3f} ms/op  driver {run['driver_cores']:.2f} cores  "
                      f"other {run['other_cores']:.2f} cores"
                      + (f"  errors {run['errors']}" if run["errors"] else ""), file=sys.stderr)
                time.sleep(0.3)
        profiled: dict[str, Any] = {}
        if args.profile:
            out_dir.mkdir(parents=True, exist_ok=True)
            for workload, conc in args.workloads:
                path = out_dir / f"profile-{workload}-c{conc}-leader.txt"
                run = run_once(cluster, workload, conc, duration_s, args.drivers, profile_to=path)
                profiled[f"{workload}:{conc}"] = {**run, "profile": path.name}
                print(f"[profile] {workload} c={conc}: {run['ops_per_s']:,.0f} ops/s under py-spy -> {path}",
                      file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted; stopping the cluster", file=sys.stderr)
        return 130
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        kill_live()
        cluster.stop()

    rows = [summarize(w, c, rs) for (w, c), rs in runs.items()]
    out_dir.mkdir(parents=True, exist_ok=True)
    report = markdown(rows, meta)
    (out_dir / "results.md").write_text(report)
    result = {
        "meta": meta,
        "workloads": [{**row, "runs": runs[(row["workload"], row["concurrency"])]} for row in rows],
        "profiled_runs": profiled,
    }
    (out_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(report)
    print(f"written: {out_dir / 'results.md'}, {out_dir / 'results.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
