"""Where a lone write spends its time: a per-stage timeline across the three nodes (issue #24).

    python -m bench.timeline                 # 300 serial writes, fsync on
    python -m bench.timeline --unsafe-no-fsync

Starts three nodes under ``bench.timeline_node`` (``regctl server`` with a
stage clock), writes one key at a time through the leader with a pause
between writes (so each write's stages stand alone), stops the nodes and
lines up each write's stages: the client's send, the leader's read, seal
and submit, the Raft thread's wake-up, append, AppendEntries and fsync, the
follower that answered first (receive, append, fsync, reply), the leader's
receipt of that reply, apply, and the answer on its way back.  Prints the
median time of each stage after the client's send and the median step from
the stage before; the steps are where a lone write waits.

Needs the pure-Python build (see bench/timeline_node.py).  The stage clock
itself costs a few microseconds per stage; compare steps, not totals, with
``bench.compare``.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import msgpack

from bench.localcluster import BenchCluster, BenchNode

#: (name, node role, recorded stage, the step it follows).  Role "L" is the leader, "F" the follower
#: whose reply reached the leader first; the step names the earlier stage the search starts from.
CHAIN: tuple[tuple[str, str, str, str], ...] = (
    ("leader reads the request", "L", "read", "client sends"),
    ("proposer seals the batch", "L", "seal", "leader reads the request"),
    ("batch handed to pysyncobj", "L", "submit", "proposer seals the batch"),
    ("leader's Raft thread wakes", "L", "wait<", "batch handed to pysyncobj"),
    ("leader's tick starts", "L", "tick", "leader's Raft thread wakes"),
    ("leader appends the entry", "L", "append", "batch handed to pysyncobj"),
    ("leader sends AppendEntries", "L", "send:append_entries", "leader appends the entry"),
    ("AppendEntries on the wire", "L", "sent", "leader sends AppendEntries"),
    ("leader's fdatasync starts", "L", "fdatasync>", "leader appends the entry"),
    ("leader's fdatasync ends", "L", "fdatasync<", "leader's fdatasync starts"),
    ("follower's socket is readable", "F", "sockread", "AppendEntries on the wire"),
    ("follower decrypts", "F", "open>", "follower's socket is readable"),
    ("follower decrypted", "F", "open<", "follower decrypts"),
    ("follower receives AppendEntries", "F", "recv:append_entries", "follower decrypted"),
    ("follower appends", "F", "append", "follower receives AppendEntries"),
    ("follower's fdatasync starts", "F", "fdatasync>", "follower appends"),
    ("follower's fdatasync ends", "F", "fdatasync<", "follower's fdatasync starts"),
    ("follower sends its reply", "F", "send:next_node_idx", "follower's fdatasync ends"),
    ("reply on the wire", "F", "sent", "follower sends its reply"),
    ("leader's socket is readable", "L", "sockread", "reply on the wire"),
    ("leader receives the reply", "L", "recv:next_node_idx", "leader's socket is readable"),
    ("leader applies", "L", "apply>", "leader receives the reply"),
    ("leader applied", "L", "apply<", "leader applies"),
    ("loop gets the outcome", "L", "complete", "leader applied"),
    ("answer queued", "L", "answer", "loop gets the outcome"),
    ("answer written", "L", "flush", "answer queued"),
)


#: Stages a run may lack: without fsync (``--unsafe-no-fsync``) no fdatasync is called.  A missing one is
#: left out of its write's line, and the stage after it counts its step from the last stage found.
OPTIONAL = frozenset({"leader's fdatasync starts", "leader's fdatasync ends", "follower's fdatasync starts",
                      "follower's fdatasync ends"})


class Stages:
    """One node's records: stage -> sorted times (ns)."""

    def __init__(self, records: Sequence[Sequence[object]]) -> None:
        self.times: dict[str, list[int]] = {}
        for t, _thread, stage in records:
            assert isinstance(t, int) and isinstance(stage, str)
            self.times.setdefault(stage, []).append(t)
        for times in self.times.values():
            times.sort()

    def first_after(self, stage: str, after: int, before: int) -> int | None:
        times = self.times.get(stage, [])
        i = bisect.bisect_left(times, after)
        return times[i] if i < len(times) and times[i] < before else None


def line_up(send: int, receive: int, leader: Stages, followers: Sequence[Stages]) -> dict[str, int] | None:
    """One write's stages (ns after the client's send), or None if a stage is missing in its window.

    The follower is the one whose reply the leader received first: the one that made the majority.
    """
    best: dict[str, int] | None = None
    for follower in followers:
        at: dict[str, int] = {"client sends": send}
        for name, role, stage, after_name in CHAIN:
            node = leader if role == "L" else follower
            after = at.get(_found_before(after_name, at))
            found = None if after is None else node.first_after(stage, after, receive)
            if found is None:
                if name in OPTIONAL:
                    continue
                break
            at[name] = found
        else:
            at["client receives"] = receive
            if best is None or at["leader receives the reply"] < best["leader receives the reply"]:
                best = at
    if best is None:
        return None
    return {name: t - send for name, t in best.items()}


#: Every stage of a line in chain order.
_NAMES = ("client sends", *(n for n, *_ in CHAIN))


def _found_before(name: str, at: dict[str, int]) -> str:
    """``name`` if it was found, else the nearest stage before it in the chain that was."""
    i = _NAMES.index(name)
    while _NAMES[i] not in at and i > 0:
        i -= 1
    return _NAMES[i]


@dataclass
class Summary:
    writes: int
    lined_up: int
    #: stage -> (median ns after the send, median ns after the stage it follows)
    stages: dict[str, tuple[float, float]]


def summarize(windows: Sequence[tuple[int, int]], leader: Stages, followers: Sequence[Stages]) -> Summary:
    lines = [line for send, receive in windows if (line := line_up(send, receive, leader, followers)) is not None]
    order = ["client sends", *(name for name, *_ in CHAIN), "client receives"]
    follows = {name: after for name, _role, _stage, after in CHAIN}
    follows["client receives"] = "answer written"
    stages: dict[str, tuple[float, float]] = {}
    for name in order:
        having = [line for line in lines if name in line]
        if not having:
            continue
        offset = statistics.median(line[name] for line in having)
        before = follows.get(name)
        step = statistics.median(line[name] - line[_found_before(before, line)] for line in having) if before else 0.0
        stages[name] = (offset, step)
    return Summary(len(windows), len(lines), stages)


def render(summary: Summary, title: str) -> str:
    out = [f"### {title}", "",
           f"{summary.lined_up} of {summary.writes} writes lined up (every stage found in the write's window).", "",
           "| stage | at (us after the client's send, median) | step from | step (us, median) |",
           "|---|---:|---|---:|"]
    follows = {name: after for name, _role, _stage, after in CHAIN}
    follows["client receives"] = "answer written"
    for name, (offset, step) in summary.stages.items():
        before = follows.get(name, "")
        if before:
            before = _found_before(before, {n: 0 for n in summary.stages})
        out.append(f"| {name} | {offset / 1000:.0f} | {before} | {step / 1000:.0f} |")
    return "\n".join(out)


class TimelineCluster(BenchCluster):
    def command(self, node: BenchNode) -> list[str]:
        cmd = super().command(node)
        return [sys.executable, "-m", "bench.timeline_node", *cmd[1:]]


def run(writes: int, gap_s: float, extra_args: tuple[str, ...], root: Path,
        env: dict[str, str] | None = None) -> tuple[Summary, dict[str, object]]:
    from registry.client import SyncClient

    out_dir = root / "records"
    out_dir.mkdir(parents=True, exist_ok=True)
    cluster = TimelineCluster(root=root / "cluster", extra_args=extra_args,
                              env={"TIMELINE_OUT": str(out_dir), **(env or {})})
    windows: list[tuple[int, int]] = []
    try:
        leader_id = cluster.start()
        leader = cluster.node(leader_id)
        client = SyncClient([leader.api])
        try:
            for i in range(50):  # warm-up: connections, caches, the first segment
                client.call("key_put", {"key": f"warm/{i}", "value": "v"})
            for i in range(writes):
                send = time.monotonic_ns()
                client.call("key_put", {"key": f"timeline/{i}", "value": "v"})
                windows.append((send, time.monotonic_ns()))
                time.sleep(gap_s)
        finally:
            client.close()
    finally:
        cluster.stop(remove=False)
    stages = {}
    for node in cluster.nodes:
        path = out_dir / f"{node.node_id}.msgpack"
        stages[node.node_id] = Stages(msgpack.unpackb(path.read_bytes(), use_list=False))
    followers = [stages[n.node_id] for n in cluster.nodes if n.node_id != leader_id]
    summary = summarize(windows, stages[leader_id], followers)
    client_us = sorted((r - s) / 1000 for s, r in windows)
    meta: dict[str, object] = {"writes": writes, "gap_ms": gap_s * 1000, "args": list(extra_args),
                               "client_p50_us": statistics.median(client_us),
                               "client_p99_us": client_us[int(len(client_us) * 0.99) - 1]}
    return summary, meta


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writes", type=int, default=300, help="serial writes measured (after 50 of warm-up)")
    parser.add_argument("--gap-ms", type=float, default=10.0, help="pause between writes, in ms")
    parser.add_argument("--unsafe-no-fsync", action="store_true", help="run the nodes with --unsafe-no-fsync")
    parser.add_argument("--root", type=Path, default=None, help="working directory (default: a new temp dir)")
    parser.add_argument("--switch-us", type=float, default=None,
                        help="experiment: the nodes' sys.setswitchinterval, in us (default: Python's 5000)")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = parser.parse_args(argv)
    import tempfile

    root = args.root or Path(tempfile.mkdtemp(prefix="regtimeline-"))
    extra = ("--unsafe-no-fsync",) if args.unsafe_no_fsync else ()
    env = {"TIMELINE_SWITCH_US": str(args.switch_us)} if args.switch_us else {}
    summary, meta = run(args.writes, args.gap_ms / 1000, extra, root, env)
    title = "fsync off (--unsafe-no-fsync)" if extra else "fsync on"
    print(render(summary, f"One lone write, {title}; client p50 {meta['client_p50_us']:.0f} us, "
                          f"p99 {meta['client_p99_us']:.0f} us"))
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "lined_up": summary.lined_up,
                                         "stages": summary.stages}, indent=1))
    print(f"\nrecords in {root}", file=sys.stderr)
    os.environ.pop("TIMELINE_OUT", None)


if __name__ == "__main__":
    main()
