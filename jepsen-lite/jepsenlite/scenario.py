"""Directed scenarios: one fault, timed against one client pattern, repeated.

The random runs find a bug only when the schedule and the clients happen to
line up; a scenario lines them up on purpose and records an ordinary history
for the ordinary checkers.

``lease-deposed-leader`` (netns): grant a lease through the leader, cut the
leader off from its peers, and keep renewing through that node alone (as a
client connected to it would) until it stops acknowledging; meanwhile probe
the lease with linearizable reads through the other nodes, without renewing
it.  The lease checker then asks: did the lease vanish sooner than TTL after
a renewal the cluster acknowledged?
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from registry.client import Client
from registry.errors import RegistryError

from .history import Recorder
from .runner import Cluster
from .workload import Context, Worker

__all__ = ["SCENARIOS", "lease_deposed_leader"]

#: Lease TTL of the scenario (the registry's minimum): the window to observe is fixed, a short TTL keeps trials short.
TTL_MS = 1000
KEEPALIVE_EVERY_S = 0.02
PROBE_EVERY_S = 0.05
#: How long after cutting the leader off we renew through it, and how long we probe.
RENEW_FOR_S = 1.6
PROBE_FOR_S = 3.0


async def _renew(worker: Worker, lease: int, cut_ns: int) -> None:
    """Renew through the cut-off node only, as a client connected to it would."""
    while time.monotonic_ns() - cut_ns < RENEW_FOR_S * 1e9:
        await worker.op("keepalive", lease, None, "lease_keepalive", {"lease": lease},
                        result=lambda body: body["ttl_ms"], timeout_s=1.0)
        await asyncio.sleep(KEEPALIVE_EVERY_S)


async def _probe(worker: Worker, lease: int, cut_ns: int) -> None:
    """Linearizable reads through the other nodes until the lease is gone."""
    while time.monotonic_ns() - cut_ns < PROBE_FOR_S * 1e9:
        out = await worker.op("probe", lease, None, "lease_get", {"lease": lease, "consistency": "linearizable"},
                              result=lambda body: {"ttl_ms": body["ttl_ms"]}, not_found_ok=True, timeout_s=1.0)
        if out.ok and out.body is None:
            return
        await asyncio.sleep(PROBE_EVERY_S)


async def lease_deposed_leader(cluster: Cluster, recorder: Recorder, seed: int, trials: int,
                               notes: list[str]) -> list[dict[str, Any]]:
    """Run the trials on a started netns cluster; return one fault window per trial."""
    windows: list[dict[str, Any]] = []
    stop = asyncio.Event()
    ctx = Context(cluster.topology.endpoints, recorder, seed, stop, op_timeout_s=2.0)
    for trial in range(trials):
        leader = await cluster.wait_leader(30)
        if leader is None:
            notes.append(f"trial {trial}: no leader, skipped")
            continue
        spec = cluster.nodes[leader].spec
        others = [n.spec.api for nid, n in cluster.nodes.items() if nid != leader]
        pinned = Worker(ctx, "lease", 0)
        await pinned.client.close()
        pinned.client = Client([spec.api], timeout_s=1.0, connect_timeout_s=0.5, client_name="jepsen-pinned")
        prober = Worker(ctx, "lease", 1)
        await prober.client.close()
        prober.client = Client(others, timeout_s=1.0, connect_timeout_s=0.5, client_name="jepsen-prober")
        try:
            out = await pinned.op("grant", None, TTL_MS, "lease_grant", {"ttl_ms": TTL_MS},
                                  result=lambda body: {"lease": body["lease"], "ttl_ms": body["ttl_ms"]},
                                  result_key=lambda body: body["lease"])
            if not out.ok:
                notes.append(f"trial {trial}: grant failed ({out.code})")
                continue
            lease = int(out.body["lease"])
            window: dict[str, Any] = {"kind": "partition", "target": "isolate-leader", "leader": leader,
                                      "nodes": [leader], "trial": trial}
            for other in cluster.nodes:
                if other != leader:
                    await cluster.drop(leader, other)
                    await cluster.drop(other, leader)
            window["start_ns"] = cut = time.monotonic_ns()
            recorder.nemesis("start-partition", [leader], {"target": "isolate-leader", "trial": trial})

            await asyncio.gather(_renew(pinned, lease, cut), _probe(prober, lease, cut))
            await cluster.heal()
            window["end_ns"] = time.monotonic_ns()
            recorder.nemesis("stop-partition", [leader], {"target": "isolate-leader", "trial": trial})
            windows.append(window)
        except RegistryError as err:
            notes.append(f"trial {trial}: {err!r}")
            await cluster.heal()
        finally:
            await pinned.close()
            await prober.close()
        await cluster.wait_healthy(30)
    return windows


SCENARIOS = {"lease-deposed-leader": lease_deposed_leader}
