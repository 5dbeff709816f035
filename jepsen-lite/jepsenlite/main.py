"""The command line of ``jepsen-lite/run``: plan, run the target, check, report.

Exit codes: 0 the history is valid; 1 a checker found a violation; 2 the
verdict is unknown, or the run could not be set up (bad arguments, missing
privileges, no leader, interrupted).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from .checker import check_history, merge_valid
from .compose import ComposeProject
from .compose import check_usable as compose_check_usable
from .disks import NodeDisks
from .history import pair, read_jsonl
from .lazyfs import LAZYFS_BIN_DEFAULT, LazyFSError, remove_dead_mounts, why_lazyfs_unavailable
from .nemesis import ALL_KINDS, KINDS, plan
from .report import count_ops, latency_summary, unavailability, write_html, write_results, write_summary, write_timeline
from .runner import NetnsNetwork, Topology, faketime_library, iptables_available, local_topology, write_json
from .scenario import SCENARIO_NEEDS_SPARE, SCENARIO_NEMESES, SCENARIO_TARGETS, SCENARIO_WORKLOADS, SCENARIOS
from .session import SessionSpec, run_session, session_main
from .workload import WORKLOADS

__all__ = ["main", "EXIT_VALID", "EXIT_VIOLATION", "EXIT_UNKNOWN"]

EXIT_VALID, EXIT_VIOLATION, EXIT_UNKNOWN = 0, 1, 2
TARGETS = ("local", "netns", "compose")
#: Deliberately unsafe node modes (see --unsafe): the run must then come back invalid.
#: ``no-fsync``: nodes started with ``--unsafe-no-fsync``; only the power nemesis can tell.
UNSAFE_MODES = ("local-reads", "no-fsync")
RUN_SCRIPT = Path(__file__).resolve().parent.parent / "run"


class UsageError(Exception):
    pass


def _names(text: str, known: tuple[str, ...], what: str, everything: tuple[str, ...] | None = None) -> list[str]:
    """The comma list ``text`` of names from ``known``; ``all`` means ``everything`` (default: all known)."""
    if text.strip() in ("all", ""):
        return list(everything or known)
    if text.strip() == "none":
        return []
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UsageError(f"unknown {what} {', '.join(unknown)} (known: {', '.join(known)}, all"
                         f"{', none' if what == 'nemesis' else ''})")
    return list(dict.fromkeys(names))


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="jepsen-lite/run", description="Fault-injection runs against raft-registry.")
    p.add_argument("--time-limit", type=float, default=30.0, help="seconds of traffic under faults (default 30)")
    p.add_argument("--seed", type=int, default=None, help="seed of the fault schedule and of the clients' choices")
    p.add_argument("--nemesis", default="all", help=f"comma list of {','.join(KINDS)}, or all "
                   f"({','.join(ALL_KINDS)}), or none")
    p.add_argument("--workload", default="all", help=f"comma list of {','.join(WORKLOADS)}, or all")
    p.add_argument("--target", default="local", help="local | netns | compose (root: docker-compose.yml's cluster)")
    p.add_argument("--out", default=None, help="output directory (default jepsen-lite/out/<time>-<seed>)")
    p.add_argument("--concurrency", type=int, default=5, help="client processes per workload (default 5)")
    p.add_argument("--nodes", type=int, default=3, help="cluster size, 3 or 5 (default 3)")
    p.add_argument("--op-timeout", type=float, default=2.0, help="client timeout per operation, seconds")
    p.add_argument("--check-budget", type=float, default=20.0, help="seconds the linearizability search may take "
                   "per key before the verdict is unknown")
    p.add_argument("--scenario", default=None, help=f"run a directed scenario instead ({', '.join(SCENARIOS)}; "
                   "netns target); --time-limit, --nemesis and --workload are then ignored")
    p.add_argument("--trials", type=int, default=5, help="trials of a --scenario (default 5)")
    p.add_argument("--unsafe", default=None, choices=UNSAFE_MODES,
                   help="self-test: run the nodes in a deliberately broken mode the checkers must catch "
                        "(local-reads: linearizable reads served locally, without the read barrier; "
                        "no-fsync: nodes never fsync, which --nemesis power must catch)")
    p.add_argument("--lazyfs", default=str(LAZYFS_BIN_DEFAULT),
                   help=f"the LazyFS binary of the power nemesis (default {LAZYFS_BIN_DEFAULT})")
    p.add_argument("--session", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _replay_command(args: argparse.Namespace, seed: int, out: Path) -> str:
    if args.scenario:
        parts = ["jepsen-lite/run", "--target", args.target, "--scenario", args.scenario, "--trials",
                 str(args.trials), "--seed", str(seed)]
        if args.unsafe:
            parts += ["--unsafe", args.unsafe]
        return " ".join(shlex.quote(p) for p in parts) + f" --out {shlex.quote(str(out))}-replay"
    parts = ["jepsen-lite/run", "--time-limit", f"{args.time_limit:g}", "--seed", str(seed), "--nemesis",
             args.nemesis, "--workload", args.workload, "--target", args.target, "--concurrency",
             str(args.concurrency)]
    if args.nodes != 3:
        parts += ["--nodes", str(args.nodes)]
    if args.op_timeout != 2.0:
        parts += ["--op-timeout", f"{args.op_timeout:g}"]
    if args.unsafe:
        parts += ["--unsafe", args.unsafe]
    if args.lazyfs != str(LAZYFS_BIN_DEFAULT):
        parts += ["--lazyfs", args.lazyfs]
    return " ".join(shlex.quote(p) for p in parts) + f" --out {shlex.quote(str(out))}-replay"


class _Terminated(Exception):
    pass


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise _Terminated(f"signal {signum}")


def _run_netns(spec: SessionSpec, network: NetnsNetwork, out: Path,
               disks: NodeDisks | None = None) -> tuple[SessionSpec, str | None]:
    """Set up namespaces, run the session inside the client namespace, always tear down.

    With ``disks`` (mounted), every node's data goes on its disk.
    """
    old_term = signal.signal(signal.SIGTERM, _raise_terminated)
    child: subprocess.Popen[bytes] | None = None
    problem: str | None = None
    try:
        stale = network.remove_stale()
        if stale:
            print(f"removed {len(stale)} stale namespace(s) of earlier runs", file=sys.stderr)
        topology = network.setup()
        if disks is not None:
            topology = disks.attach(topology)
        spec.topology = topology
        spec_path = out / "session-spec.json"
        write_json(spec_path, spec.to_json())
        assert topology.client_netns is not None
        child = subprocess.Popen(["ip", "netns", "exec", topology.client_netns, sys.executable, str(RUN_SCRIPT),
                                  "--session", str(spec_path)])
        rc = child.wait()
        if rc != 0:
            problem = f"session process exited with {rc}"
    except (KeyboardInterrupt, _Terminated) as err:
        problem = f"interrupted ({type(err).__name__})"
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    finally:
        network.teardown()
        signal.signal(signal.SIGTERM, old_term)
    return spec, problem


def _run_compose(spec: SessionSpec, project: ComposeProject, out: Path) -> tuple[SessionSpec, str | None]:
    """Bring up a compose project, run the session against it from here, always take it down (volumes too)."""
    old_term = signal.signal(signal.SIGTERM, _raise_terminated)
    problem: str | None = None
    try:
        spec.topology = project.setup()
        write_json(out / "session-spec.json", spec.to_json())
        info = asyncio.run(run_session(spec))
        if info["status"] != "done":
            problem = info.get("error") or info["status"]
    except (KeyboardInterrupt, _Terminated) as err:
        problem = f"interrupted ({type(err).__name__})"
    except RuntimeError as err:
        problem = f"compose setup failed: {err}"
    finally:
        try:
            project.teardown()
        except (RuntimeError, subprocess.TimeoutExpired) as err:
            print(f"jepsen-lite: compose teardown failed, remove project {project.name} by hand: {err}",
                  file=sys.stderr)
        signal.signal(signal.SIGTERM, old_term)
    return spec, problem


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.session:
        return session_main(args.session)
    try:
        return _main(args)
    except UsageError as err:
        print(f"jepsen-lite: {err}", file=sys.stderr)
        return EXIT_UNKNOWN


def _main(args: argparse.Namespace) -> int:
    if args.target not in TARGETS:
        raise UsageError(f"unknown target {args.target!r} (local, netns, compose)")
    if args.target == "compose" and args.nodes != 3:
        raise UsageError("the compose target runs docker-compose.yml's three nodes: --nodes 3")
    if args.scenario is not None:
        if args.scenario not in SCENARIOS:
            raise UsageError(f"unknown scenario {args.scenario!r} (known: {', '.join(SCENARIOS)})")
        if args.target not in SCENARIO_TARGETS[args.scenario]:
            raise UsageError(f"scenario {args.scenario} runs on --target "
                             f"{' or '.join(SCENARIO_TARGETS[args.scenario])}")
        if args.trials < 1:
            raise UsageError("--trials must be positive")
        args.workload, args.nemesis = SCENARIO_WORKLOADS[args.scenario], "none"
    workloads = _names(args.workload, tuple(WORKLOADS), "workload")
    nemeses = _names(args.nemesis, KINDS, "nemesis", ALL_KINDS)
    if not workloads:
        raise UsageError("at least one workload is needed")
    if args.time_limit <= 0 or args.concurrency < 1 or args.op_timeout <= 0:
        raise UsageError("--time-limit, --concurrency and --op-timeout must be positive")
    if args.nodes not in (3, 5):
        raise UsageError("--nodes must be 3 or 5")
    if args.target == "netns":
        why = NetnsNetwork.check_usable()
        if why:
            raise UsageError(why)
    if args.target == "compose":
        why = compose_check_usable()
        if why:
            raise UsageError(why)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(3), "big")
    out = Path(args.out or Path(__file__).resolve().parent.parent / "out" / f"{time.strftime('%Y%m%d-%H%M%S')}-{seed}")
    out.mkdir(parents=True, exist_ok=True)

    notes: list[str] = []
    skipped: dict[str, str] = {}
    faketime_lib = faketime_library()
    if "partition" in nemeses:
        if args.target not in ("netns", "compose"):
            skipped["partition"] = "partitions need separate network stacks: use --target netns (root)"
        elif not iptables_available():
            skipped["partition"] = "iptables is not installed (apt-get install iptables)"
    if "clock" in nemeses and args.target == "compose":
        skipped["clock"] = "the node image has no libfaketime: use --target local or netns"
    elif "clock" in nemeses and faketime_lib is None:
        skipped["clock"] = "libfaketime is not installed (apt-get install faketime)"
    if "membership" in nemeses and args.target == "compose":
        skipped["membership"] = "docker-compose.yml has no spare node to add: use --target local or netns"
    if "power" in nemeses:
        why_not = why_lazyfs_unavailable(Path(args.lazyfs))
        if args.target == "compose":
            skipped["power"] = "the compose volumes are not on LazyFS: use --target local or netns"
        elif why_not is not None:
            skipped["power"] = why_not
    for name, why in skipped.items():
        notes.append(f"nemesis {name} skipped: {why}")
    active = [n for n in nemeses if n not in skipped]
    faults = plan(seed, active, args.time_limit)
    clock_rate_max = max([1.0, *(f.rate for f in faults if f.rate is not None)])

    cluster_root = out / "cluster"
    placeholder = Topology(args.target, (), "")
    spec = SessionSpec(str(out), seed, args.time_limit, workloads, args.concurrency, args.op_timeout, placeholder,
                       faults, faketime_lib, args.scenario, args.trials, args.unsafe)
    spares = 1 if "membership" in active or args.scenario in SCENARIO_NEEDS_SPARE else 0
    problem: str | None = None
    started = time.monotonic()
    what = (f"scenario {args.scenario} x{args.trials}" if args.scenario else
            f"workloads {','.join(workloads)}, nemesis {','.join(active) or 'none'}, {len(faults)} fault(s)")
    print(f"jepsen-lite: seed {seed}, target {args.target}, {what}, output {out}", file=sys.stderr)
    # The power nemesis's disks: one LazyFS mount per node, mounted here (the session may run in another
    # process) and unmounted after the session stopped every node, whatever happened.
    disks = (NodeDisks(cluster_root / "disks", [f"n{i}" for i in range(1, args.nodes + spares + 1)],
                       Path(args.lazyfs)) if "power" in active else None)
    # SIGTERM must not skip the unmount (the session handles it on its own while it runs).
    old_term = signal.signal(signal.SIGTERM, _raise_terminated) if disks is not None else None
    try:
        if disks is not None:
            dead = remove_dead_mounts()
            if dead:
                print(f"detached {len(dead)} LazyFS mount(s) of earlier runs whose LazyFS was gone", file=sys.stderr)
            disks.mount_all()
        if args.target == "local":
            spec.topology = local_topology(cluster_root, args.nodes, spares)
            if disks is not None:
                spec.topology = disks.attach(spec.topology)
            write_json(out / "session-spec.json", spec.to_json())
            info = asyncio.run(run_session(spec))
            if info["status"] != "done":
                problem = info.get("error") or info["status"]
        elif args.target == "compose":
            spec, problem = _run_compose(spec, ComposeProject(cluster_root), out)
        else:
            spec, problem = _run_netns(spec, NetnsNetwork(cluster_root, args.nodes, spares), out, disks)
    except LazyFSError as err:
        problem = f"LazyFS: {err}"
    except (KeyboardInterrupt, _Terminated) as err:
        if disks is None:
            raise
        problem = f"interrupted ({type(err).__name__})"
    finally:
        if disks is not None:
            notes += [f"LazyFS: {p}" for p in disks.unmount_all()]
            signal.signal(signal.SIGTERM, old_term)

    results = _check_and_report(args, seed, out, spec, workloads, active, skipped, notes, clock_rate_max, problem,
                                time.monotonic() - started)
    print((out / "summary.txt").read_text(), end="", file=sys.stderr)
    if results["valid"] is True:
        return EXIT_VALID
    if results["valid"] is False:
        return EXIT_VIOLATION
    return EXIT_UNKNOWN


def _check_and_report(args: argparse.Namespace, seed: int, out: Path, spec: SessionSpec, workloads: list[str],
                      active: list[str], skipped: dict[str, str], notes: list[str], clock_rate_max: float,
                      problem: str | None, elapsed_s: float) -> dict[str, Any]:
    import json

    session: dict[str, Any] = {}
    if (out / "session.json").exists():
        session = json.loads((out / "session.json").read_text())
    if session.get("error"):
        problem = str(session["error"])
    elif session.get("status") == "interrupted" and problem is None:
        problem = "interrupted"
    history_path = out / "history.jsonl"
    events = read_jsonl(history_path) if history_path.exists() else []
    ops = pair(events)
    t0 = int(session.get("t0_ns") or (events[0].time if events else 0))
    checks = check_history(ops, workloads, clock_rate_max=clock_rate_max, deadline_s=args.check_budget,
                           convergence=session.get("convergence"))
    valid = merge_valid([c.valid for c in checks.values()])
    notes = [*notes, *session.get("nemesis_notes", [])]
    if session.get("recovered") is False:
        notes.append("the cluster did not recover (all nodes up, one leader) within the deadline after healing")
    for err in session.get("worker_errors", []) + session.get("nemesis_errors", []):
        notes.append(f"internal error: {err}")
    if problem is not None:
        # A violation found in a partial history is still a violation; otherwise we cannot say.
        if valid is not False:
            valid = "unknown"
    faults = []
    planned: list[Any] = [f.to_json() for f in spec.faults]
    for i, window in enumerate(session.get("faults", [])):
        entry = dict(window)
        entry["start_s"] = round((window.get("start_ns", t0) - t0) / 1e9, 3)
        entry["duration_s"] = round((window.get("end_ns", window.get("start_ns", t0)) - window.get("start_ns", t0))
                                    / 1e9, 3)
        if i < len(planned):
            entry["planned"] = planned[i]
        faults.append(entry)
    results: dict[str, Any] = {
        "valid": valid,
        "seed": seed,
        "target": args.target,
        "time_limit_s": args.time_limit,
        "workloads": workloads,
        "nemeses": active if not args.scenario else SCENARIO_NEMESES[args.scenario],
        "scenario": args.scenario,
        "unsafe": args.unsafe,
        "skipped_nemeses": skipped,
        "concurrency": args.concurrency,
        "nodes": args.nodes,
        "op_timeout_s": args.op_timeout,
        "checkers": {name: res.to_json() for name, res in checks.items()},
        "counts": count_ops(ops),
        "latency_ms": latency_summary(ops, t0, session.get("t_end_ns")),
        "unavailability": unavailability(ops, t0, int(session.get("t_end_ns") or t0)),
        "nemesis_schedule": [f.to_json() for f in spec.faults],
        "faults": faults,
        "recovered": session.get("recovered"),
        "recovered_after_s": session.get("recovered_after_s"),
        "node_starts": session.get("node_starts"),
        "notes": notes,
        "elapsed_s": round(elapsed_s, 1),
        "replay": _replay_command(args, seed, out),
    }
    if problem is not None:
        results["error"] = problem
    if session.get("traceback"):
        results["traceback"] = session["traceback"]
    write_results(out / "results.json", results)
    write_summary(out / "summary.txt", results)
    markers = []
    if session.get("t_end_ns"):
        markers.append((int(session["t_end_ns"]), "time limit"))
    if session.get("healed_ns"):
        markers.append((int(session["healed_ns"]), "healed"))
    title = (f"seed {seed} · {args.target} · {','.join(workloads)} · nemesis {','.join(active) or 'none'} · "
             f"valid {valid}")
    write_timeline(out / "timeline.svg", ops, session.get("faults", []), t0, markers=markers, title=title)
    write_html(out / "report.html", results, ops, session.get("faults", []), t0, markers=markers, title=title)
    return results
