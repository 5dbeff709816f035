"""Consul blocking queries (issue 19): many waiting on one node, woken by one change.

Starts a three-node cluster of real ``regctl server --consul-http`` processes on 127.0.0.1
(``localcluster``), registers one instance of ``web``, then for each round:

1. opens ``--queries`` concurrent ``GET /v1/health/service/web?index=I&wait=5m`` on one node
   (``--node``, default the leader) and waits until the node reports them all waiting
   (``regctl_consul_blocking_queries``);
2. measures the node's CPU time (``/proc/PID/stat``, every thread) over ``--idle`` seconds with
   every query waiting, against the same with none waiting first: an idle poll should cost nothing;
3. registers one more instance (one write through Raft) and records when each query's answer
   arrives: the wake latency, from the write's start and from its acknowledgement.

Client and node share the machine's cores, so the latencies include this process parsing every
answer.  Prints a Markdown table and writes ``DIR/consul.json`` (default
``bench/results/consul-<timestamp>``).  Nothing is sent anywhere but 127.0.0.1.

    python -m bench.consul                     # 1000 queries, 3 rounds
    python -m bench.consul --queries 200 --rounds 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.localcluster import BenchCluster, BenchNode, cpu_seconds
from registry.client import Client
from registry.server.ports import ports_free

#: Every waiting query must have reached the node within this.
SETTLE_S = 120.0


class ConsulBenchCluster(BenchCluster):
    """Node i also serves Consul's HTTP API on base + 300 + i."""

    def __init__(self) -> None:
        for _ in range(50):
            super().__init__(3)
            if ports_free([self.consul_port(n) for n in self.nodes]):
                return
        raise RuntimeError("no free ports for the Consul listeners")

    def consul_port(self, node: BenchNode) -> int:
        return self.base + 300 + int(node.node_id[1:])

    def command(self, node: BenchNode) -> list[str]:
        return [*super().command(node), "--consul-http", f"127.0.0.1:{self.consul_port(node)}"]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _waiting(session: aiohttp.ClientSession, http: str) -> int:
    async with session.get(f"http://{http}/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith("regctl_consul_blocking_queries "):
            return int(float(line.split()[1]))
    return 0


async def _block(session: aiohttp.ClientSession, url: str, index: str) -> tuple[float, str]:
    async with session.get(url, params={"index": index, "wait": "5m"}) as resp:
        await resp.read()
        assert resp.status == 200, resp.status
        return time.perf_counter(), resp.headers["X-Consul-Index"]


async def _cpu_over(pid: int, seconds: float) -> float:
    before = cpu_seconds(pid)
    await asyncio.sleep(seconds)
    return cpu_seconds(pid) - before


async def run(args: argparse.Namespace, cluster: ConsulBenchCluster, leader: str) -> dict[str, Any]:
    node = cluster.node(args.node or leader)
    url = f"http://127.0.0.1:{cluster.consul_port(node)}/v1/health/service/web"
    rounds: list[dict[str, Any]] = []
    client = Client(cluster.endpoints)
    try:
        await client.register("web", "w0", "10.0.0.1", 80)
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=None)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            async with session.get(url) as resp:
                index = resp.headers["X-Consul-Index"]
            idle_none_s = await _cpu_over(node.pid, args.idle)
            for number in range(1, args.rounds + 1):
                tasks = [asyncio.create_task(_block(session, url, index)) for _ in range(args.queries)]
                deadline = time.monotonic() + SETTLE_S
                while await _waiting(session, node.http) < args.queries:
                    if time.monotonic() > deadline:
                        raise RuntimeError("the queries did not all reach the node")
                    await asyncio.sleep(0.2)
                idle_waiting_s = await _cpu_over(node.pid, args.idle)
                cpu_before = cpu_seconds(node.pid)
                client_cpu_before = time.process_time()
                started = time.perf_counter()
                await client.register("web", f"w{number}", "10.0.0.1", 80 + number)
                acked = time.perf_counter()
                done = await asyncio.gather(*tasks)
                wake_cpu_s = cpu_seconds(node.pid) - cpu_before
                client_cpu_s = time.process_time() - client_cpu_before
                indexes = {i for _, i in done}
                assert len(indexes) == 1 and int(indexes.pop()) > int(index), "every query saw the one new index"
                index = done[0][1]
                from_start = [(t - started) * 1000 for t, _ in done]
                from_ack = [max(0.0, (t - acked) * 1000) for t, _ in done]
                rounds.append({
                    "round": number,
                    "queries": args.queries,
                    "write_ms": (acked - started) * 1000,
                    "wake_ms_p50": statistics.median(from_start),
                    "wake_ms_p99": _pct(from_start, 0.99),
                    "wake_ms_max": max(from_start),
                    "after_ack_ms_p99": _pct(from_ack, 0.99),
                    "idle_cpu_pct_none": 100 * idle_none_s / args.idle,
                    "idle_cpu_pct_waiting": 100 * idle_waiting_s / args.idle,
                    "wake_cpu_ms": wake_cpu_s * 1000,
                    "client_cpu_ms": client_cpu_s * 1000,
                })
    finally:
        await client.close()
    return {"node": node.node_id, "leader": leader, "idle_s": args.idle, "rounds": rounds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=1000, help="concurrent blocking queries")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of idle CPU measured per round")
    parser.add_argument("--node", default=None, help="node id to query (default: the leader)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    # Started and stopped outside the event loop: the cluster's readiness check uses the sync client.
    cluster = ConsulBenchCluster()
    try:
        result = asyncio.run(run(args, cluster, cluster.start()))
    finally:
        cluster.stop()
    out = args.out or Path("bench/results") / time.strftime("consul-%Y-%m-%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    (out / "consul.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.queries} blocking queries on {result['node']} (leader {result['leader']}); results in {out}\n")
    print("| round | write ms | wake p50 ms | wake p99 ms | wake max ms | p99 after ack ms | node CPU idle, "
          "none waiting | node CPU idle, all waiting | node CPU to wake all | client CPU to read all |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in result["rounds"]:
        print(f"| {r['round']} | {r['write_ms']:.1f} | {r['wake_ms_p50']:.1f} | {r['wake_ms_p99']:.1f} | "
              f"{r['wake_ms_max']:.1f} | {r['after_ack_ms_p99']:.1f} | {r['idle_cpu_pct_none']:.2f}% | "
              f"{r['idle_cpu_pct_waiting']:.2f}% | {r['wake_cpu_ms']:.0f} ms | {r['client_cpu_ms']:.0f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
