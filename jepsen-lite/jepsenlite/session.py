"""One run against a cluster: start nodes, drive traffic under the nemesis, heal, final reads.

The session is what must run where the clients live: in the runner's own
process on the ``local`` target, in a child process inside the client
namespace on ``netns`` (``jepsen-lite/run --session SPEC.json``).  It reads
its whole configuration from a spec file, writes ``history.jsonl`` and
``session.json`` into the output directory, and always stops the nodes it
started -- on success, on error, on SIGINT and on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from registry.client import Client
from registry.errors import NotFound, RegistryError

from .compose import make_cluster
from .history import Recorder, write_jsonl
from .nemesis import Fault, Nemesis
from .runner import Cluster, NodeSpec, Topology, write_json
from .scenario import SCENARIOS
from .workload import WORKLOADS, Context, Worker

__all__ = ["SessionSpec", "run_session", "session_main"]

#: How long the cluster gets to elect its first leader, and to recover after the faults.
STARTUP_DEADLINE_S = 30.0
RECOVERY_DEADLINE_S = 30.0
#: How long the per-node comparison waits for every node to report one revision.
CONVERGE_DEADLINE_S = 20.0
#: How often the final reads look for nodes that exited after healing.
WATCH_DEAD_EVERY_S = 0.5


@dataclass
class SessionSpec:
    out_dir: str
    seed: int
    time_limit_s: float
    workloads: list[str]
    concurrency: int
    op_timeout_s: float
    topology: Topology
    faults: list[Fault] = field(default_factory=list)
    faketime_lib: str | None = None
    #: A directed scenario (scenario.SCENARIOS) instead of random workloads and faults.
    scenario: str | None = None
    trials: int = 5
    #: A deliberately unsafe node mode (main.UNSAFE_MODES), to show the checkers catch it.
    unsafe: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "out_dir": self.out_dir,
            "seed": self.seed,
            "time_limit_s": self.time_limit_s,
            "workloads": self.workloads,
            "concurrency": self.concurrency,
            "op_timeout_s": self.op_timeout_s,
            "topology": self.topology.to_json(),
            "faults": [f.to_json() for f in self.faults],
            "faketime_lib": self.faketime_lib,
            "scenario": self.scenario,
            "trials": self.trials,
            "unsafe": self.unsafe,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> SessionSpec:
        return cls(obj["out_dir"], int(obj["seed"]), float(obj["time_limit_s"]), list(obj["workloads"]),
                   int(obj["concurrency"]), float(obj["op_timeout_s"]), Topology.from_json(obj["topology"]),
                   [Fault.from_json(f) for f in obj["faults"]], obj.get("faketime_lib"), obj.get("scenario"),
                   int(obj.get("trials", 5)), obj.get("unsafe"))


async def _drive(spec: SessionSpec, cluster: Cluster, recorder: Recorder, info: dict[str, Any]) -> None:
    cluster.start_all()
    leader = await cluster.wait_leader(STARTUP_DEADLINE_S)
    if leader is None:
        dead = [nid for nid in cluster.nodes if not cluster.running(nid)]
        if dead:
            raise RuntimeError(f"node(s) {', '.join(dead)} exited at startup; last log lines of {dead[0]}:\n"
                               + cluster.log_tail(dead[0]))
        raise RuntimeError(f"the cluster elected no leader within {STARTUP_DEADLINE_S:g}s")
    info["first_leader"] = leader
    if spec.scenario is not None:
        info["t0_ns"] = time.monotonic_ns()
        notes: list[str] = []
        info["nemesis_notes"] = notes
        info["faults"] = await SCENARIOS[spec.scenario](cluster, recorder, spec.seed, spec.trials, notes)
        info["t_end_ns"] = info["healed_ns"] = time.monotonic_ns()
        info["recovered"] = await cluster.wait_healthy(RECOVERY_DEADLINE_S)
        info["convergence"] = await converge(cluster)
        return
    stop = asyncio.Event()
    ctx = Context(cluster.topology.endpoints, recorder, spec.seed, stop, spec.op_timeout_s)
    workloads = [WORKLOADS[name]() for name in spec.workloads]
    t0 = time.monotonic_ns()
    info["t0_ns"] = t0
    nemesis = Nemesis(cluster, spec.faults, recorder, t0)
    info["faults"] = nemesis.windows
    info["nemesis_notes"] = nemesis.notes
    workers: list[Worker] = []

    async def drive(workload: Any, worker: Worker) -> None:
        try:
            await workload.run(worker)
        finally:
            await worker.close()

    tasks = []
    for workload in workloads:
        for slot in range(spec.concurrency):
            worker = Worker(ctx, workload.name, slot)
            workers.append(worker)
            tasks.append(asyncio.create_task(drive(workload, worker), name=f"{workload.name}-{slot}"))
    nemesis_task = asyncio.create_task(nemesis.run(), name="nemesis")
    try:
        await asyncio.sleep(spec.time_limit_s)
        stop.set()
        info["t_end_ns"] = time.monotonic_ns()
        # Every operation is bounded by the op timeout; a lapsing lease probe is the longest wait.
        done, pending = await asyncio.wait(tasks, timeout=spec.op_timeout_s * 4 + 10)
        for task in pending:
            task.cancel()
        for task in done:
            if task.exception() is not None:
                info.setdefault("worker_errors", []).append(f"{task.get_name()}: {task.exception()!r}")
        if not nemesis_task.done():
            nemesis_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await nemesis_task
        if not nemesis_task.cancelled() and nemesis_task.exception() is not None:
            info.setdefault("nemesis_errors", []).append(repr(nemesis_task.exception()))
    finally:
        stop.set()
        for task in [*tasks, nemesis_task]:
            task.cancel()
        await asyncio.gather(*tasks, nemesis_task, return_exceptions=True)
        await nemesis.heal_all()
    info["healed_ns"] = time.monotonic_ns()
    healthy = await cluster.wait_healthy(RECOVERY_DEADLINE_S)
    info["recovered"] = healthy
    info["recovered_after_s"] = round((time.monotonic_ns() - info["healed_ns"]) / 1e9, 3)
    final = asyncio.create_task(_finals(workloads, ctx), name="final-reads")
    try:
        while not final.done():
            await asyncio.wait({final}, timeout=WATCH_DEAD_EVERY_S)
            # Started by heal_all and gone since: they refused to start (say, a log they found corrupt).
            dead = [nid for nid in cluster.nodes if not cluster.running(nid)]
            if dead:
                info["exited_after_healing"] = {nid: cluster.log_tail(nid, 1) for nid in dead}
            if len(dead) > len(cluster.nodes) // 2 and not final.done():
                # No final read can succeed now: say why instead of retrying each read until its deadline.
                raise RuntimeError(f"node(s) {', '.join(dead)} exited after healing, so no majority is left for "
                                   f"the final reads; last log line of {dead[0]}: "
                                   f"{info['exited_after_healing'][dead[0]]}")
        final.result()
    finally:
        final.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await final
    info["final_done_ns"] = time.monotonic_ns()
    info["convergence"] = await converge(cluster)


async def _finals(workloads: list[Any], ctx: Context) -> None:
    for workload in workloads:
        await workload.final(ctx)


async def _node_state(spec: NodeSpec, revision: int) -> dict[str, Any]:
    """Stale reads of everything the workloads touch, from one node, at >= ``revision``."""
    client = Client([spec.api], timeout_s=5.0, connect_timeout_s=1.0, client_name="jepsen-converge")
    state: dict[str, Any] = {}
    revisions = set()
    reads = [("keys", "key_list", {"prefix": "jepsen-"}), ("set", "service_get", {"name": "jepsen-set"}),
             ("leases", "lease_list", {}), ("lock", "lock_get", {"name": "jepsen-lock"})]
    try:
        for name, op, args in reads:
            try:
                rev, body = await client.call(op, {**args, "consistency": "stale", "min_revision": revision},
                                              retry=False)
            except NotFound:
                rev, body = -1, None
            if rev >= 0:
                revisions.add(rev)
            state[name] = body
    except (RegistryError, OSError, TimeoutError) as err:
        return {"error": f"{type(err).__name__}: {err}"}
    finally:
        await client.close()
    if len(revisions) != 1:
        return {"error": f"state moved during the reads (revisions {sorted(revisions)})"}
    return {"revision": revisions.pop(), "state": state}


async def converge(cluster: Cluster) -> dict[str, Any]:
    """Read every node's state once all report one revision (lease expiries may still move it)."""
    result: dict[str, Any] = {}
    end = time.monotonic() + CONVERGE_DEADLINE_S
    while time.monotonic() < end:
        statuses = await asyncio.gather(*(cluster.status(nid) for nid in cluster.nodes))
        revs = {st.get("revision") for st in statuses if st}
        if len(revs) == 1 and all(statuses):
            revision = int(revs.pop() or 0)
            snaps = await asyncio.gather(*(_node_state(n.spec, revision) for n in cluster.nodes.values()))
            result = {"nodes": dict(zip(cluster.nodes, snaps, strict=True))}
            answered = {s.get("revision") for s in snaps if "state" in s}
            if len(answered) == 1 and all("state" in s for s in snaps):
                return result
        await asyncio.sleep(0.5)
    return result


async def run_session(spec: SessionSpec) -> dict[str, Any]:
    """Run one session; return what happened (also written to session.json)."""
    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    recorder = Recorder()
    cluster = make_cluster(spec.topology, faketime_lib=spec.faketime_lib)
    if spec.unsafe == "local-reads":
        # registry.failpoints, read by regctl server at start (loudly logged and shown in its status).
        cluster.node_env["REGCTL_FAILPOINTS"] = "unsafe-local-reads"
    elif spec.unsafe == "no-fsync":
        # Everything is written, nothing is fsynced: a power cut (--nemesis power) loses acknowledged writes.
        cluster.node_args.append("--unsafe-no-fsync")
    info: dict[str, Any] = {"status": "running", "started_unix": time.time()}
    main = asyncio.current_task()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        if main is not None:
            loop.add_signal_handler(sig, main.cancel)
    try:
        await _drive(spec, cluster, recorder, info)
        info["status"] = "done"
    except asyncio.CancelledError:
        info["status"] = "interrupted"
    except Exception as err:
        info["status"] = "error"
        info["error"] = f"{type(err).__name__}: {err}"
        info["traceback"] = traceback.format_exc()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        cluster.stop_all()
        info["node_starts"] = {nid: n.starts for nid, n in cluster.nodes.items()}
        write_jsonl(out / "history.jsonl", recorder.events)
        write_json(out / "session.json", info)
    return info


def session_main(spec_path: str) -> int:
    """Entry point of the child process on the netns target."""
    spec = SessionSpec.from_json(json.loads(Path(spec_path).read_text()))
    info = asyncio.run(run_session(spec))
    return 0 if info["status"] == "done" else 2
