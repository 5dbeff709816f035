"""The nemesis: a seeded schedule of faults, applied to a running cluster and healed.

``plan`` is pure: from (seed, kinds, time limit, cluster size) it builds the
whole schedule up front -- which fault, when, for how long, and a seeded
``pick`` that chooses nodes -- so a run replays from its seed.  Only what
"the leader" is at that moment is decided at run time (and recorded).

Faults (each lasts a few seconds, then is healed; gaps between them):

``kill``       kill -9 the leader, a random node, or (rarely) every node, then
               restart it on the same data directory.
``pause``      SIGSTOP the leader or a random node, then SIGCONT.
``partition``  (netns target only) iptables DROP at the receiver:
               ``isolate-leader``, ``isolate-node``, ``halves`` (a random
               minority against the majority), ``bridge`` (two sides that
               cannot talk, one node talking to both), ``syn-drop`` (one-way:
               new TCP connections from one node to another are dropped).
``clock``      restart a node with libfaketime making its clock run at a
               different rate (x0.5 .. x2: its timers, elections and lease
               countdowns speed up or slow down); healed by a normal restart.
``membership`` ``remove-follower``: the leader removes a follower (``member_remove``),
               which is then stopped; healed by starting it again (with its data:
               a node under a former member's address must keep its log and vote,
               see README bug 2) and adding it back (``member_add``).
               ``add-node``: start a spare node and add it (four members, quorum
               three); healed by removing and stopping it (its data kept too).
``power``      a power cut: kill -9 every node, or a seeded majority (the
               two alternate, every node first), then drop every byte their
               disks had not fsynced (each node's data is on a LazyFS mount of
               its own, disks.py); healed by starting them again on what is
               left.  Not part of ``all``: it needs root, FUSE and LazyFS, and
               keeping ``all`` as it was keeps old seeds replaying the same
               schedules.

Everything is healed before the final reads: ``heal_all`` resumes paused
nodes, restarts dead or clock-skewed ones, flushes every rule and makes the
members exactly the starting nodes again.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import asdict, dataclass
from typing import Any

from .history import Recorder
from .runner import Cluster

__all__ = ["Fault", "KINDS", "ALL_KINDS", "POWER_TARGETS", "PARTITION_SHAPES", "plan", "Nemesis", "partition_groups",
           "power_victims"]

KINDS = ("kill", "pause", "partition", "clock", "membership", "power")
#: What ``--nemesis all`` means: every kind that needs no special disk.
ALL_KINDS = ("kill", "pause", "partition", "clock", "membership")
#: Power cuts alternate between these, in this order.
POWER_TARGETS = ("all", "majority")
MEMBERSHIP_CHANGES = ("remove-follower", "add-node")
PARTITION_SHAPES = ("isolate-leader", "isolate-node", "halves", "bridge", "syn-drop")
CLOCK_RATES = (0.5, 1.5, 2.0)
#: Fault length and the quiet gap after it, in seconds.
FAULT_S = (2.0, 5.0)
GAP_S = (1.0, 3.0)
#: Nothing starts before this (the cluster settles) or ends later than this before the time limit.
WARMUP_S_MAX = 3.0
COOLDOWN_S = 1.0


@dataclass(frozen=True, slots=True)
class Fault:
    kind: str
    start_s: float
    duration_s: float
    #: kill/pause/clock: "leader" | "random" | "all"; partition: the shape.
    target: str
    #: Seeded number that picks nodes (random victims, partition sides).
    pick: int
    rate: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Fault:
        return cls(**obj)


def plan(seed: int, kinds: list[str], time_limit_s: float) -> list[Fault]:
    """The fault schedule of a run: pure function of its arguments."""
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"unknown nemesis {kind!r}")
    rng = random.Random(f"nemesis/{seed}")
    faults: list[Fault] = []
    if not kinds:
        return faults
    t = min(WARMUP_S_MAX, time_limit_s * 0.15)
    while True:
        duration = round(rng.uniform(*FAULT_S), 3)
        if t + duration > time_limit_s - COOLDOWN_S:
            break
        kind = rng.choice(sorted(kinds))
        pick = rng.randrange(1 << 30)
        rate = None
        if kind == "kill":
            target = rng.choices(("leader", "random", "all"), weights=(45, 45, 10))[0]
        elif kind == "pause":
            target = rng.choice(("leader", "random"))
        elif kind == "partition":
            target = rng.choice(PARTITION_SHAPES)
        elif kind == "membership":
            target = rng.choice(MEMBERSHIP_CHANGES)
        elif kind == "power":
            target = POWER_TARGETS[sum(f.kind == "power" for f in faults) % len(POWER_TARGETS)]
        else:
            target = rng.choice(("leader", "random"))
            rate = rng.choice(CLOCK_RATES)
        faults.append(Fault(kind, round(t, 3), duration, target, pick, rate))
        t += duration + rng.uniform(*GAP_S)
    return faults


def partition_groups(shape: str, nodes: list[str], leader: str | None, pick: int) -> list[tuple[str, str, bool]]:
    """Drop rules for a partition shape: (receiver, sender, syn_only) triples.  Pure."""
    rng = random.Random(pick)
    ids = sorted(nodes)
    victim = leader if shape == "isolate-leader" and leader is not None else ids[pick % len(ids)]
    rules: list[tuple[str, str, bool]] = []

    def cut(side_a: list[str], side_b: list[str]) -> None:
        for a in side_a:
            for b in side_b:
                rules.append((a, b, False))
                rules.append((b, a, False))

    if shape in ("isolate-leader", "isolate-node"):
        cut([victim], [n for n in ids if n != victim])
    elif shape == "halves":
        shuffled = ids[:]
        rng.shuffle(shuffled)
        minority = shuffled[: len(ids) // 2]
        cut(minority, shuffled[len(ids) // 2:])
    elif shape == "bridge":
        shuffled = ids[:]
        rng.shuffle(shuffled)
        middle = len(shuffled) // 2
        # shuffled[middle] talks to both sides; the sides cannot talk to each other.
        cut(shuffled[:middle], shuffled[middle + 1:])
    elif shape == "syn-drop":
        src = leader if leader is not None else victim
        dst = rng.choice([n for n in ids if n != src])
        rules.append((dst, src, True))
    else:
        raise ValueError(f"unknown partition shape {shape!r}")
    return rules


def power_victims(target: str, nodes: list[str], pick: int) -> list[str]:
    """The nodes a power cut takes: all of them, or a majority chosen by the seeded pick (sorted).  Pure."""
    ids = sorted(nodes)
    if target == "all":
        return ids
    if target == "majority":
        shuffled = ids[:]
        random.Random(pick).shuffle(shuffled)
        return sorted(shuffled[: len(ids) // 2 + 1])
    raise ValueError(f"unknown power target {target!r} (known: {', '.join(POWER_TARGETS)})")


class Nemesis:
    """Applies a schedule to a cluster; records each fault window in the history."""

    def __init__(self, cluster: Cluster, faults: list[Fault], recorder: Recorder, t0_ns: int) -> None:
        self.cluster = cluster
        self.faults = faults
        self.recorder = recorder
        self.t0_ns = t0_ns
        #: What actually happened: one dict per fault, with resolved nodes and times.
        self.windows: list[dict[str, Any]] = []
        self.notes: list[str] = []
        #: Static nodes the membership nemesis removed (heal_all leaves their restart to restore_membership).
        self.removed: set[str] = set()

    def _node_ids(self) -> list[str]:
        return sorted(self.cluster.nodes)

    async def _victims(self, fault: Fault, window: dict[str, Any]) -> list[str]:
        ids = self._node_ids()
        if fault.target == "all":
            return ids
        if fault.target == "leader":
            leader = await self.cluster.leader()
            if leader is not None:
                return [leader]
            self.notes.append(f"{fault.kind} planned at {fault.start_s}s: no leader found, hit a random node instead")
            window["target"] = "random (no leader)"
        return [ids[fault.pick % len(ids)]]

    async def run(self) -> None:
        for fault in self.faults:
            delay = self.t0_ns / 1e9 + fault.start_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            window = await self.apply(fault)
            try:
                await asyncio.sleep(max(0.0, fault.duration_s - (time.monotonic_ns() - window["start_ns"]) / 1e9))
            finally:
                await self.heal(fault, window)

    async def apply(self, fault: Fault) -> dict[str, Any]:
        cluster = self.cluster
        window: dict[str, Any] = {"kind": fault.kind, "target": fault.target, "planned_start_s": fault.start_s,
                                  "start_ns": time.monotonic_ns()}
        if fault.kind in ("kill", "pause", "clock"):
            victims = await self._victims(fault, window)
            window["nodes"] = victims
            for node in victims:
                if fault.kind == "kill":
                    cluster.kill(node)
                elif fault.kind == "pause":
                    cluster.pause(node)
                else:
                    cluster.kill(node)
                    cluster.start(node, clock_rate=fault.rate)
            if fault.rate is not None:
                window["rate"] = fault.rate
        elif fault.kind == "membership":
            await self._change_membership(fault, window)
        elif fault.kind == "power":
            victims = power_victims(fault.target, self._node_ids(), fault.pick)
            window["nodes"] = victims
            cut = asyncio.ensure_future(asyncio.to_thread(cluster.power_off, victims))
            try:
                window["unsynced_bytes"] = await asyncio.shield(cut)
            except asyncio.CancelledError:
                # Finish the cut before anyone (heal_all) restarts these nodes: a clear under a running node
                # would take bytes it is about to fsync, and the run would blame the registry.
                await asyncio.wait({cut})
                raise
            except RuntimeError as err:
                # The nodes are down but maybe with their unsynced data: the run did not test what it says.
                window["error"] = str(err)
                self.notes.append(f"power {fault.target} at {fault.start_s}s: {err}")
                raise
        elif fault.kind == "partition":
            leader = await cluster.leader()
            rules = partition_groups(fault.target, self._node_ids(), leader, fault.pick)
            window["leader"] = leader
            window["drops"] = [f"{dst}<-{src}{' (SYN)' if syn else ''}" for dst, src, syn in rules]
            for dst, src, syn in rules:
                await cluster.drop(dst, src, syn_only=syn)
        else:
            raise ValueError(f"unknown fault kind {fault.kind!r}")
        if fault.kind != "membership":  # a membership window starts with the change request
            window["start_ns"] = time.monotonic_ns()
        self.recorder.nemesis(f"start-{fault.kind}", window.get("nodes"), {k: v for k, v in window.items()
                                                                          if k not in ("start_ns",)})
        self.windows.append(window)
        return window

    async def heal(self, fault: Fault, window: dict[str, Any]) -> None:
        cluster = self.cluster
        if fault.kind in ("kill", "power"):
            for node in window.get("nodes", []):
                if not cluster.running(node):
                    cluster.start(node)
        elif fault.kind == "pause":
            for node in window.get("nodes", []):
                cluster.resume(node)
        elif fault.kind == "clock":
            for node in window.get("nodes", []):
                cluster.kill(node)
                cluster.start(node)
        elif fault.kind == "partition":
            await cluster.heal()
        elif fault.kind == "membership":
            try:
                for node in window.get("nodes", []):
                    if fault.target == "remove-follower" and node in self.removed:
                        await cluster.add_member(node)
                        self.removed.discard(node)
                    elif fault.target == "add-node":
                        await cluster.remove_member(node)
            except RuntimeError as err:
                self.notes.append(f"membership {fault.target} at {fault.start_s}s: heal failed ({err}); "
                                  "restored before the final reads")
        window["end_ns"] = time.monotonic_ns()
        self.recorder.nemesis(f"stop-{fault.kind}", window.get("nodes"), {"target": fault.target})

    async def heal_all(self) -> None:
        """Undo anything still in effect (also after an interrupted schedule)."""
        cluster = self.cluster
        for window in self.windows:
            window.setdefault("end_ns", time.monotonic_ns())
        for node_id, node in cluster.nodes.items():
            if node.paused:
                cluster.resume(node_id)
            if node.clock_rate is not None:
                cluster.kill(node_id)
            if not cluster.running(node_id) and node_id not in self.removed:
                cluster.start(node_id)
        if cluster.partitionable:
            await cluster.heal()
        if any(f.kind == "membership" for f in self.faults):
            try:
                done = await cluster.restore_membership()
                if done:
                    self.notes.append(f"membership restored after the schedule: {', '.join(done)}")
                self.removed.clear()
            except RuntimeError as err:
                self.notes.append(f"membership could not be restored: {err}")

    async def _change_membership(self, fault: Fault, window: dict[str, Any]) -> None:
        """Remove a follower, or add a spare; the window starts once the change is made."""
        cluster = self.cluster
        if fault.target == "add-node":
            if not cluster.spares:
                raise RuntimeError("the membership nemesis needs a spare node in the topology")
            spare = sorted(cluster.spares)[fault.pick % len(cluster.spares)]
            window["nodes"] = [spare]
            try:
                await cluster.add_member(spare)
            except RuntimeError as err:
                self.notes.append(f"membership add-node at {fault.start_s}s: {err}")
                window["error"] = str(err)
        else:
            leader = await cluster.wait_leader(5.0)
            if leader is None:
                self.notes.append(f"membership remove-follower at {fault.start_s}s: no leader, nothing changed")
                window["error"] = "no leader"
                window["nodes"] = []
                return
            followers = [n for n in self._node_ids() if n != leader]
            victim = followers[fault.pick % len(followers)]
            window["nodes"] = [victim]
            window["leader"] = leader
            self.removed.add(victim)
            try:
                await cluster.remove_member(victim)
            except RuntimeError as err:
                self.notes.append(f"membership remove-follower at {fault.start_s}s: {err}")
                window["error"] = str(err)
