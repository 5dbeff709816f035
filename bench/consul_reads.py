"""Health-service reads through the Consul API against etcd's range read through its JSON gateway (issue 19).

Two three-node clusters on 127.0.0.1, one after the other (never both running): ours with
``--consul-http`` (``bench.consul``), etcd (``bench.etcdcluster``, data on tmpfs when there is one).
The same ten instances are stored in each: registered instances here, ten JSON values under one
prefix there.  Then, against the leader, ``--connections`` keep-alive connections each send one
request after another for ``--seconds``:

* ours: ``GET /v1/health/service/web?stale`` and the same without ``?stale`` (linearizable: a read
  barrier through Raft, shared by concurrent reads);
* etcd: ``POST /v3/kv/range`` over the prefix with ``serializable: true`` and without (ReadIndex).

Both sides use the same client (aiohttp), in this one process, so its cost is the same on both.
Prints a Markdown table (answers/s, p50, p99, server CPU per answer) and writes ``DIR/consul_reads.json``.

    python -m bench.consul_reads                 # 5 s per case, 32 connections
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from bench.consul import ConsulBenchCluster
from bench.etcdcluster import EtcdCluster
from bench.localcluster import cpu_seconds
from registry.client import SyncClient

INSTANCES = 10
PREFIX = b"/bench-health/web/"

Request = Callable[[aiohttp.ClientSession], Awaitable[None]]


async def _load(make: Request, connections: int, seconds: float, pids: list[int]) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=connections)
    latencies: list[float] = []
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(connections):  # warm the connections up
            await make(session)
        stop_at = time.monotonic() + seconds

        async def loop() -> None:
            while time.monotonic() < stop_at:
                began = time.perf_counter()
                await make(session)
                latencies.append(time.perf_counter() - began)

        cpu_before = sum(cpu_seconds(pid) for pid in pids)
        began = time.monotonic()
        await asyncio.gather(*(loop() for _ in range(connections)))
        elapsed = time.monotonic() - began
        cpu = sum(cpu_seconds(pid) for pid in pids) - cpu_before
    ordered = sorted(latencies)
    return {
        "answers": len(latencies),
        "per_s": len(latencies) / elapsed,
        "p50_ms": statistics.median(ordered) * 1000,
        "p99_ms": ordered[int(0.99 * (len(ordered) - 1))] * 1000,
        "server_cpu_us_per_answer": 1e6 * cpu / max(1, len(latencies)),
    }


def _ours(args: argparse.Namespace) -> list[dict[str, Any]]:
    cluster = ConsulBenchCluster()
    try:
        leader = cluster.node(cluster.start())
        with SyncClient(cluster.endpoints) as client:
            for i in range(INSTANCES):
                client.register("web", f"web-{i}", "10.0.0.1", 8000 + i, tags=["v1", "zone a"], meta={"zone": "a"})
        url = f"http://127.0.0.1:{cluster.consul_port(leader)}/v1/health/service/web"
        out = []
        for mode, query in (("stale", "?stale"), ("linearizable", "")):
            async def get(session: aiohttp.ClientSession, target: str = url + query) -> None:
                async with session.get(target) as resp:
                    body = await resp.read()
                    assert resp.status == 200 and body.count(b'"CheckID"') == INSTANCES, resp.status

            result = asyncio.run(_load(get, args.connections, args.seconds, [n.pid for n in cluster.nodes]))
            out.append({"system": "regctl (Consul API)", "read": mode, **result})
        return out
    finally:
        cluster.stop()


def _etcd(args: argparse.Namespace) -> list[dict[str, Any]]:
    cluster = EtcdCluster(durable=False)
    try:
        leader = cluster.node(cluster.start())
        for i in range(INSTANCES):
            value = {"service": "web", "id": f"web-{i}", "address": "10.0.0.1", "port": 8000 + i,
                     "tags": ["v1", "zone a"], "meta": {"zone": "a"}, "status": "passing"}
            cluster.post(leader.api, "/v3/kv/put", {"key": base64.b64encode(PREFIX + f"web-{i}".encode()).decode(),
                                                    "value": base64.b64encode(json.dumps(value).encode()).decode()})
        end = PREFIX[:-1] + bytes([PREFIX[-1] + 1])
        out = []
        for mode, serializable in (("stale", True), ("linearizable", False)):
            doc = json.dumps({"key": base64.b64encode(PREFIX).decode(), "range_end": base64.b64encode(end).decode(),
                              "serializable": serializable}).encode()

            async def post(session: aiohttp.ClientSession, body: bytes = doc) -> None:
                async with session.post(f"http://{leader.api}/v3/kv/range", data=body,
                                        headers={"Content-Type": "application/json"}) as resp:
                    reply = await resp.read()
                    assert resp.status == 200 and reply.count(b'"key"') == INSTANCES, resp.status

            result = asyncio.run(_load(post, args.connections, args.seconds, [n.pid for n in cluster.nodes]))
            out.append({"system": "etcd (JSON gateway)", "read": mode, **result})
        return out
    finally:
        cluster.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = _ours(args) + _etcd(args)
    out = args.out or Path("bench/results") / time.strftime("consul-reads-%Y-%m-%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    (out / "consul_reads.json").write_text(json.dumps({"args": vars(args) | {"out": str(out)}, "rows": rows},
                                                      indent=2) + "\n")
    print(f"{INSTANCES} instances, {args.connections} connections to the leader, {args.seconds:g} s each; "
          f"results in {out}\n")
    print("| system | read | answers/s | p50 ms | p99 ms | server CPU per answer (3 nodes) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['system']} | {r['read']} | {r['per_s']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
              f"{r['server_cpu_us_per_answer']:.0f} us |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
