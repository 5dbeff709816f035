"""raft-registry and etcd side by side: the same load driver, the same machine, the same run.

    python -m bench.compare [--quick] [--out DIR] [--duration S] [--repeats N] [--workloads register:256,watch:1000]
    python -m bench.compare --scale [--quick]     # the scale runs (scale.py)

Two pairs, each like with like.  The headline: three nodes of ours with their default durability (the
Raft log fsynced before anything relies on it) against three etcd members with their data on disk (etcd's
default: an fsync per WAL batch).  The second: ours with ``--unsafe-no-fsync`` against etcd with its data
on tmpfs (where an fsync costs nothing).  For every workload the same driver (``loadgen.py``; ``watch.py``
for watches) runs against each system in turn, alternating the order, for the same duration and
``--repeats`` times; the report gives medians and, per pair, ratios ours/etcd.  ``--pairs durable`` or
``--pairs unsafe`` runs one pair only.

Writes DIR/results.json, DIR/results.md, DIR/throughput.png and DIR/latency.png (default
``bench/results/compare-<timestamp>``).  Everything runs on 127.0.0.1; every process started here is
stopped on exit, on error and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench import etcdload, run, scale, watch
from bench.etcdcluster import EtcdCluster, etcd_version
from bench.loadgen import READ_SERVICE
from bench.localcluster import BenchCluster, LoadTarget
from registry.client import SyncClient
from registry.raft import PYSYNCOBJ_VERSION

BENCH_DIR = Path(__file__).resolve().parent

SYSTEMS = ("ours", "etcd_disk", "ours_nofsync", "etcd")
LABELS = {"ours": "raft-registry", "etcd_disk": "etcd (disk)", "ours_nofsync": "raft-registry --unsafe-no-fsync",
          "etcd": "etcd (tmpfs)"}
#: (ours, etcd) of each pair: the headline compares durable with durable, the second unfsynced with tmpfs.
PAIRS = {"durable": ("ours", "etcd_disk"), "unsafe": ("ours_nofsync", "etcd")}
DURABILITY = {
    "ours": run.durability(fsync=True),
    "etcd_disk": "etcd with its default durability: data dirs on the disk, WAL fsynced before a write is "
                 "acknowledged (survives power loss).",
    "ours_nofsync": run.durability(fsync=False),
    "etcd": "etcd WAL and bbolt on tmpfs (/dev/shm): etcd fsyncs as usual, but an fsync on tmpfs is free, so "
            "like ours without fsync an acknowledged write survives kill -9 of every member, not a power loss "
            "(etcd 3.4 has no --unsafe-no-fsync).",
}

DEFAULT_PLAN: list[tuple[str, int]] = [
    ("register", 1),
    ("register", 16),
    ("register", 256),
    ("get_linearizable", 256),
    ("lease_keepalive", 256),
    ("watch", 100),
    ("watch", 1000),
]
#: Targets on each pair's ratios ours/etcd: (ratio key, "<=" or ">=", value).  Durable: issue 18's;
#: unsafe: issue 10's.
TARGETS: dict[str, dict[tuple[str, int], tuple[str, str, float]]] = {
    "durable": {
        ("register", 256): ("ops_ratio", ">=", 3.0),
        ("register", 1): ("p50_ratio", "<=", 1.0),
        ("register", 16): ("p99_ratio", "<=", 1.0),
    },
    "unsafe": {
        ("register", 256): ("ops_ratio", ">=", 3.0),
        ("register", 16): ("p99_ratio", "<=", 1.0),
        ("get_linearizable", 256): ("ops_ratio", ">=", 3.0),
        ("lease_keepalive", 256): ("ops_ratio", ">=", 5.0),
        ("watch", 1000): ("ops_ratio", ">=", 3.0),
    },
}

WATCH_WRITERS = 64
WATCH_DRAIN_S = 2.0
_KEYS = ("ops_per_s", "p50_ms", "p99_ms", "p999_ms", "cpu_ms_per_op", "server_cores", "driver_cores", "other_cores",
         "writes_per_s", "delivered_fraction", "fsyncs_per_s", "ops_per_fsync")


def _on_signal(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def parse_plan(text: str) -> list[tuple[str, int]]:
    return run.parse_plan(text, {w for w, _ in DEFAULT_PLAN}, "N (concurrency; for watch, watchers)")


def machine_info() -> dict[str, Any]:
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    return {"cpus": os.cpu_count(), "cpu_model": model, "memory_gib": round(mem_kb / 2**20, 1),
            "kernel": platform.release(), "os": _os_name(), "python": platform.python_version(),
            "loadavg_start": Path("/proc/loadavg").read_text().split()[:3]}


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.system()


def seed_reads(ours: list[BenchCluster], etcds: list[EtcdCluster]) -> None:
    """The 3-instance service the read workload gets, on every system."""
    for cluster in ours:
        with SyncClient(cluster.endpoints, timeout_s=10.0) as client:
            for i in range(3):
                client.register(READ_SERVICE, f"r{i}", "10.0.0.2", 9000 + i, meta={"zone": "a"}, tags=["bench"])
    for etcd in etcds:
        for i in range(3):
            record = {"service": READ_SERVICE, "id": f"r{i}", "address": "10.0.0.2", "port": 9000 + i,
                      "meta": {"zone": "a"}, "tags": ["bench"], "status": "passing"}
            etcd.post(etcd.endpoints[0], "/v3/kv/put",
                         {"key": etcdload.b64(etcdload.READ_PREFIX + f"r{i}".encode()),
                          "value": etcdload.b64(json.dumps(record).encode())})


def run_watch(cluster: LoadTarget, system: str, watchers: int, duration_s: float, drain_s: float,
              drivers: int = 1) -> dict[str, Any]:
    leader = cluster.leader()
    if leader is None:
        raise RuntimeError(f"{system}: no leader")
    follower = next(n.node_id for n in cluster.nodes if n.node_id != leader)
    row = watch.run_round(cluster, leader, follower, watchers, min(drivers, watchers), WATCH_WRITERS, duration_s,
                          drain_s, system=system)
    # In the common columns: one op = one event delivered to one watcher.
    return {**row, "ops_per_s": row["events_per_s"], "p50_ms": row["latency_p50_ms"],
            "p99_ms": row["latency_p99_ms"], "p999_ms": None,
            "server_cores": row["all_nodes_cores"], "driver_cores": row["watch_driver_cores"],
            "cpu_ms_per_op": row["all_nodes_cores"] * duration_s * 1000 / max(1, row["events_in_window"]),
            "other_cores": max(0.0, row["machine_busy_cores"] - row["all_nodes_cores"] - row["watch_driver_cores"]
                               - row["writer_cores"]),
            "errors": row["write_errors"], "leader_changed": cluster.leader() != leader}


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"repeats": len(runs)}
    for key in _KEYS:
        values = [r[key] for r in runs if r.get(key) is not None and r[key] == r[key]]  # r[key] == r[key]: not NaN
        out[key] = statistics.median(values) if values else None
    out["errors"] = sum(sum(r["errors"].values()) for r in runs)
    out["leader_changes"] = sum(1 for r in runs if r["leader_changed"])
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarize(workload: str, num: int, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    row: dict[str, Any] = {"workload": workload, ("watchers" if workload == "watch" else "concurrency"): num}
    for system, rs in runs.items():
        if rs:
            row[system] = medians(rs)
    for pair, (ours_name, etcd_name) in PAIRS.items():
        ours, etcd = row.get(ours_name), row.get(etcd_name)
        if ours is None or etcd is None:
            continue
        ratios: dict[str, Any] = {
            "ops_ratio": _ratio(ours.get("ops_per_s"), etcd.get("ops_per_s")),
            "p50_ratio": _ratio(ours.get("p50_ms"), etcd.get("p50_ms")),
            "p99_ratio": _ratio(ours.get("p99_ms"), etcd.get("p99_ms")),
        }
        run.mark_target(ratios, TARGETS[pair].get((workload, num)))
        row[pair] = ratios
    return row


def _num(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def workload_label(row: dict[str, Any]) -> str:
    if row["workload"] == "watch":
        return f"watch, {row['watchers']} watchers"
    names = {"register": "register / put", "get_linearizable": "linearizable read", "get_stale": "stale read",
             "lease_keepalive": "lease keepalive"}
    return f"{names.get(row['workload'], row['workload'])}, c={row['concurrency']}"


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    m = meta["machine"]

    def storage(system: str) -> str:
        where = meta["etcd_storage"].get(system)
        return f" (data on {where})" if where else ""

    lines = [
        f"# raft-registry vs etcd, {meta['started']}",
        "",
        f"- Machine: {m['cpus']} CPU(s) ({m['cpu_model']}), {m['memory_gib']} GiB, {m['os']}, kernel {m['kernel']}; "
        f"both clusters, the driver and anything else running share it (loadavg at start "
        f"{' '.join(m['loadavg_start'])}).",
        f"- raft-registry: 3 `regctl server` processes, cluster key on, Python {m['python']}, "
        f"pysyncobj {meta['pysyncobj']}. etcd {meta['etcd_version']}: 3 members, driven through its v3 JSON "
        "gateway with a lean keep-alive HTTP/1.1 client (one connection per request in flight).",
        "- Durability. " + " ".join(f"**{LABELS[s]}**{storage(s)}: {DURABILITY[s]}" for s in meta["durability"]),
        f"- Each workload: {meta['duration_s']:g} s measured (after {meta['warmup_s']:g} s warm-up; watches: "
        f"{WATCH_WRITERS} writers, {meta['watch_drain_s']:g} s drain), {meta['repeats']} repeat(s) alternating the "
        "systems' order, medians. Ratio = ours / etcd within each pair.",
        "- Ops: register = one instance registration (etcd: a put of the same JSON record); linearizable read = "
        "a 3-instance service (etcd: a range over 3 keys, default linearizable); lease keepalive over "
        f"{meta['leases']:,} leases, to the leader (etcd: one POST /v3/lease/keepalive each, i.e. one "
        "gateway stream per keepalive, where gRPC clients keep one stream); watch = events delivered per "
        "second summed over the watchers on one follower (etcd: one HTTP connection per watch), latency from "
        "the write's send to the watcher. fsyncs/s: our leader's fdatasyncs of its Raft log in the window, "
        "with client ops per fdatasync.",
    ]
    titles = {"durable": "Durable against durable (the headline): ours fsyncs its Raft log, etcd's data is on disk",
              "unsafe": "Without fsync: ours with --unsafe-no-fsync, etcd's data on tmpfs"}
    for pair, (ours_name, etcd_name) in PAIRS.items():
        pair_rows = [r for r in rows if pair in r]
        if not pair_rows:
            continue
        lines += ["", f"## {titles[pair]}", "",
                  "| workload | ours ops/s | etcd ops/s | ratio | ours p50 / p99 ms | etcd p50 / p99 ms | p50 ratio "
                  "| p99 ratio | ours fsyncs/s (ops/fsync) | target |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in pair_rows:
            ours, etcd, ratios = r[ours_name], r[etcd_name], r[pair]
            target = f"{ratios['target']}: {'met' if ratios['target_met'] else 'MISSED'}" if "target" in ratios else ""
            fsyncs = ("-" if ours.get("fsyncs_per_s") is None else
                      f"{_num(ours['fsyncs_per_s'], ',.0f')} ({_num(ours.get('ops_per_fsync'), '.1f')})")
            lines.append(
                f"| {workload_label(r)} | {_num(ours.get('ops_per_s'), ',.0f')} "
                f"| {_num(etcd.get('ops_per_s'), ',.0f')} | {_num(ratios['ops_ratio'], '.2f')}x "
                f"| {_num(ours.get('p50_ms'), '.2f')} / {_num(ours.get('p99_ms'), '.1f')} "
                f"| {_num(etcd.get('p50_ms'), '.2f')} / {_num(etcd.get('p99_ms'), '.1f')} "
                f"| {_num(ratios['p50_ratio'], '.2f')}x | {_num(ratios['p99_ratio'], '.2f')}x | {fsyncs} | {target} |")
    lines += ["", "CPU per op (ms, all three server processes) and cores used during the window, medians:", "",
              "| workload | system | CPU ms/op | server cores | driver cores | other cores | errors | leader changes |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        for system in SYSTEMS:
            s = r.get(system)
            if s is None:
                continue
            lines.append(f"| {workload_label(r)} | {LABELS[system]} | {_num(s['cpu_ms_per_op'], '.3f')} "
                         f"| {_num(s['server_cores'], '.2f')} | {_num(s['driver_cores'], '.2f')} "
                         f"| {_num(s['other_cores'], '.2f')} | {s['errors']} | {s['leader_changes']} |")
    if any(r["workload"] in ("watch", "lease_keepalive") for r in rows):
        lines += ["", "etcd's keepalive and watch rows go through its HTTP/JSON gateway: a keepalive opens a gateway "
                  "stream per request, and every event reaches every watcher as its own JSON document on its own "
                  "connection. They measure the gateway as much as etcd (a gRPC client would see more from etcd): "
                  "read those ratios as upper bounds."]
    watch_rows = [r for r in rows if r["workload"] == "watch"]
    if watch_rows:
        lines += ["", "Watches: writes/s and share of the events delivered by the end of the drain (below 100%: "
                  "the watchers fell behind, and the latencies, of delivered events only, are optimistic):", ""]
        for r in watch_rows:
            cells = [f"{LABELS[s]} {_num(r[s]['writes_per_s'], ',.0f')} writes/s, "
                     f"{_num(r[s]['delivered_fraction'], '.0%')} delivered" for s in SYSTEMS if s in r]
            lines.append(f"- {r['watchers']} watchers: " + "; ".join(cells))
    if any(r.get(s, {}).get("leader_changes") for r in rows for s in SYSTEMS):
        lines += ["", "WARNING: a leader changed during some runs (see results.json); rerun on a quieter machine."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """throughput.png and latency.png; nothing (and a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib not installed (pip install '.[bench]'); no plots", file=sys.stderr)
        return []
    colors = {"ours": "#1f77b4", "etcd_disk": "#8c564b", "ours_nofsync": "#aec7e8", "etcd": "#ff7f0e"}
    labels = [workload_label(r) for r in rows]
    width = 0.2
    fig, ax = plt.subplots(figsize=(max(8.0, 1.4 * len(rows)), 4.8))
    for i, system in enumerate(SYSTEMS):
        xs = [j + (i - 1.5) * width for j, r in enumerate(rows) if r.get(system, {}).get("ops_per_s")]
        ys = [r[system]["ops_per_s"] for r in rows if r.get(system, {}).get("ops_per_s")]
        if ys:
            ax.bar(xs, ys, width, label=LABELS[system], color=colors[system])
    ax.set_yscale("log")
    ax.set_ylabel("ops/s (watch: events delivered/s), log scale")
    ax.set_xticks(range(len(rows)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_title("Throughput, medians")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths = [out_dir / "throughput.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    cols = min(4, len(rows))
    nrows = -(-len(rows) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 3.2 * nrows), squeeze=False)
    for k, r in enumerate(rows):
        ax = axes[k // cols][k % cols]
        for i, system in enumerate(SYSTEMS):
            s = r.get(system)
            if s is None:
                continue
            pcts = [(name, s[key]) for name, key in (("p50", "p50_ms"), ("p99", "p99_ms"), ("p99.9", "p999_ms"))
                    if s.get(key)]
            ax.bar([j + (i - 1.5) * width for j in range(len(pcts))], [v for _, v in pcts], width,
                   color=colors[system], label=LABELS[system])
            ax.set_xticks(range(len(pcts)), [n for n, _ in pcts])
        ax.set_yscale("log")
        ax.set_title(labels[k], fontsize=9)
        ax.set_ylabel("ms", fontsize=8)
    for k in range(len(rows), nrows * cols):
        axes[k // cols][k % cols].axis("off")
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(SYSTEMS), fontsize=8)
    fig.suptitle("Latency percentiles (log scale), medians over repeats")
    fig.tight_layout(rect=(0.0, 0.07, 1.0, 1.0))  # room for the legend under the panels
    paths.append(out_dir / "latency.png")
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def one_run(system: str, cluster: LoadTarget, workload: str, num: int, args: argparse.Namespace) -> dict[str, Any]:
    if workload == "watch":
        return run_watch(cluster, "etcd" if system.startswith("etcd") else "registry", num, args.duration,
                         args.drain, args.watch_drivers)
    extra: dict[str, Any] = {"system": "etcd" if system.startswith("etcd") else "registry", "leases": args.leases,
                             "warmup_s": args.warmup,
                             # Granted by the first keepalive run on this cluster, renewed by every run.
                             "leases_file": str(cluster.root / "bench-leases.json")}
    return run.run_once(cluster, workload, num, args.duration, args.drivers, extra_spec=extra)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 s per workload, 1 repeat, 1,000 leases")
    parser.add_argument("--out", type=Path, default=None, help="output dir (default bench/results/compare-<time>)")
    parser.add_argument("--duration", type=float, default=None, help="seconds measured per run (default 5)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per workload and system (default 3)")
    parser.add_argument("--workloads", type=parse_plan, default=DEFAULT_PLAN,
                        help="comma-separated NAME:N (default: " + ",".join(f"{w}:{n}" for w, n in DEFAULT_PLAN) + ")")
    parser.add_argument("--leases", type=int, default=None, help="leases renewed round-robin (default 10,000)")
    parser.add_argument("--warmup", type=float, default=run.WARMUP_S, help="seconds of load before each window")
    parser.add_argument("--drain", type=float, default=WATCH_DRAIN_S,
                        help="seconds watchers keep reading after the write window")
    parser.add_argument("--drivers", type=int, default=1, help="driver processes per run (default 1)")
    parser.add_argument("--watch-drivers", type=int, default=1,
                        help="watcher processes per watch run (default 1). The etcd watch path costs the driver "
                             "~45 us per event (a JSON line per event per watcher) against ~1-2 us for ours: "
                             "check 'driver cores' and raise this if it nears 1")
    parser.add_argument("--pairs", default="durable,unsafe",
                        help="which pairs to run: durable (ours fsynced vs etcd on disk, the headline), unsafe "
                             "(ours --unsafe-no-fsync vs etcd on tmpfs); default both")
    parser.add_argument("--wait-quiet", type=float, default=None, metavar="CORES",
                        help="before each run wait (up to --quiet-timeout s) until the machine is busy below CORES")
    parser.add_argument("--quiet-timeout", type=float, default=120.0)
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--scale", action="store_true", help="run the scale benchmark instead (scale.py)")
    args, rest = parser.parse_known_args(argv)
    if args.scale:
        return scale.main([*(["--quick"] if args.quick else []), *(["--out", str(args.out)] if args.out else []),
                           *rest])
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.duration = duration_s = args.duration if args.duration is not None else (2.0 if args.quick else 5.0)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    args.leases = leases = args.leases if args.leases is not None else (1_000 if args.quick else 10_000)
    if duration_s <= 0 or repeats < 1 or leases < 1 or args.warmup < 0 or args.drain < 0 or args.watch_drivers < 1:
        parser.error("--duration must be positive, --repeats, --leases and --watch-drivers at least 1, "
                     "--warmup and --drain >= 0")
    started = datetime.datetime.now()
    out_dir: Path = args.out or BENCH_DIR / "results" / started.strftime("compare-%Y%m%d-%H%M%S")
    plan: list[tuple[str, int]] = args.workloads
    pairs = [p.strip() for p in args.pairs.split(",") if p.strip()]
    if not pairs or any(p not in PAIRS for p in pairs):
        parser.error(f"--pairs takes a comma-separated subset of {', '.join(PAIRS)}")

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    clusters: dict[str, Any] = {}
    runs: dict[tuple[str, int], dict[str, list[dict[str, Any]]]] = {key: {s: [] for s in SYSTEMS} for key in plan}
    try:
        # Each cluster's constructor installs/locates etcd and picks ports; start() waits for a leader.
        if "durable" in pairs:
            clusters["ours"] = BenchCluster(extra_args=run.server_args(fsync=True))
            clusters["etcd_disk"] = EtcdCluster(durable=True)
        if "unsafe" in pairs:
            clusters["ours_nofsync"] = BenchCluster(extra_args=run.server_args(fsync=False))
            clusters["etcd"] = EtcdCluster(durable=False)
        for cluster in clusters.values():  # all at once: their elections overlap instead of queueing
            cluster.launch()
        for name, cluster in clusters.items():
            leader = cluster.wait_leader(60.0)
            print(f"{LABELS[name]} up: leader {leader}, endpoints {','.join(cluster.endpoints)}, data {cluster.root}",
                  file=sys.stderr)
        seed_reads([c for n, c in clusters.items() if n.startswith("ours")],
                   [c for n, c in clusters.items() if n.startswith("etcd")])
        etcd_binary = next(c for n, c in clusters.items() if n.startswith("etcd")).binary
        meta: dict[str, Any] = {
            "started": started.isoformat(timespec="seconds"), "machine": machine_info(),
            "pysyncobj": PYSYNCOBJ_VERSION, "etcd_version": etcd_version(etcd_binary),
            "duration_s": duration_s, "warmup_s": args.warmup, "repeats": repeats, "leases": leases,
            "drivers": args.drivers, "watch_drivers": args.watch_drivers, "watch_writers": WATCH_WRITERS,
            "watch_drain_s": args.drain,
            "durability": {s: DURABILITY[s] for s in clusters},
            "etcd_storage": {s: clusters[s].storage for s in clusters if s.startswith("etcd")},
            "pairs": {pair: PAIRS[pair] for pair in pairs},
            "ratio": "ours / etcd within each pair",
        }
        for rep in range(repeats):
            for workload, num in plan:
                systems = [s for s in SYSTEMS if s in clusters]
                if rep % 2:
                    systems.reverse()  # alternate who goes first: drift in the machine's load hits both
                for system in systems:
                    if args.wait_quiet is not None:
                        run.wait_quiet(args.wait_quiet, args.quiet_timeout)
                    result = one_run(system, clusters[system], workload, num, args)
                    runs[(workload, num)][system].append(result)
                    print(f"[{rep + 1}/{repeats}] {workload:<17} {num:<5} {LABELS[system]:<19} "
                          f"{result['ops_per_s']:>9,.0f} ops/s  p50 {result['p50_ms']:.2f} ms  "
                          f"p99 {result['p99_ms']:.2f} ms  other {result['other_cores']:.2f} cores"
                          + (f"  errors {result['errors']}" if result["errors"] else ""), file=sys.stderr)
                    time.sleep(0.3)
    except KeyboardInterrupt:
        print("interrupted; stopping the clusters", file=sys.stderr)
        return 130
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        run.kill_live()
        # In parallel: each waits up to its grace period for its processes to exit.
        with concurrent.futures.ThreadPoolExecutor(max(1, len(clusters))) as pool:
            list(pool.map(lambda c: c.stop(), clusters.values()))
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)

    meta["machine"]["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    rows = [summarize(w, n, rs) for (w, n), rs in runs.items()]
    out_dir.mkdir(parents=True, exist_ok=True)
    report = markdown(rows, meta)
    (out_dir / "results.md").write_text(report)
    result = {"meta": meta, "workloads": [{**row, "runs": runs[(row["workload"], row.get("watchers") or
                                                                row["concurrency"])]} for row in rows]}
    (out_dir / "results.json").write_text(json.dumps(_clean(result), indent=2) + "\n")
    plots = [] if args.no_plots else plot(rows, out_dir)
    print(report)
    print("written: " + ", ".join(str(p) for p in [out_dir / "results.md", out_dir / "results.json", *plots]),
          file=sys.stderr)
    return 0


def _clean(value: Any) -> Any:
    """NaN (a percentile of nothing) as null: results.json stays strict JSON."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
