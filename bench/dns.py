"""DNS benchmark (issue 23): queries/s one node answers, p50/p99, node CPU per query, Raft latency under load.

Starts a three-node cluster of real ``regctl server --dns`` processes on 127.0.0.1 (``localcluster``),
registers a service of 10 and one of 100 instances, then for each of A and SRV on each service, against
the leader's DNS port (the node whose Raft thread the cluster's writes wait for):

1. ``--workers`` load processes (``python -m bench.dns --worker ...``), each with one UDP socket and
   ``--inflight`` queries outstanding, send the same question (EDNS, 1232 bytes, as modern resolvers
   do) for ``--seconds``; each reports answers, lost queries and every answer's latency;
2. the node's CPU time (``/proc/PID/stat``, every thread) over the run gives CPU per query;
3. meanwhile this process writes a key serially (each write is one Raft round through the node's Raft
   thread and back): its p50/p99 under DNS load, against the same with no load first, shows whether
   the DNS flood starves the leader's Raft thread.

Prints a Markdown table and writes ``DIR/dns.json`` (default ``bench/results/dns-<timestamp>``).
Nothing is sent anywhere but 127.0.0.1.

    python -m bench.dns                  # 5 s per case, 2 workers x 64 in flight
    python -m bench.dns --seconds 2      # quicker
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dnslib import EDNS0, DNSRecord

from bench.localcluster import BenchCluster, BenchNode, cpu_seconds
from registry.client import SyncClient

#: Queries a worker keeps outstanding before it waits for an answer; a lost one is given up after this.
LOST_AFTER_S = 0.5
CASES = (("svc10", "A"), ("svc10", "SRV"), ("svc100", "A"), ("svc100", "SRV"))


class DnsCluster(BenchCluster):
    """The benchmark cluster with DNS on every node: node i at base+400+i, as ``regctl up`` lays it out."""

    def dns_addr(self, node: BenchNode) -> tuple[str, int]:
        return "127.0.0.1", self.base + 400 + int(node.node_id[1:])

    def command(self, node: BenchNode) -> list[str]:
        host, port = self.dns_addr(node)
        return [*super().command(node), "--dns", f"{host}:{port}"]


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def worker(host: str, port: int, name: str, qtype: str, seconds: float, inflight: int,
           rate_per_s: float) -> dict[str, Any]:
    """Keep ``inflight`` queries outstanding on one UDP socket for ``seconds`` (at most ``rate_per_s``
    sent a second when positive); every answer's latency."""
    question = DNSRecord.question(name, qtype)
    question.add_ar(EDNS0(udp_len=1232))
    template = bytearray(question.pack())
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((host, port))
    sock.settimeout(LOST_AFTER_S)
    sent_at = [0.0] * 65536
    next_id = 0
    latencies: list[float] = []
    lost = 0
    truncated = 0

    started = time.perf_counter()
    sent = 0

    def send() -> None:
        nonlocal next_id, sent
        if rate_per_s > 0:
            # Paced: never ahead of the rate (a sleep of 0.2 ms is the granularity that costs no CPU).
            while sent > rate_per_s * (time.perf_counter() - started):
                time.sleep(0.0002)
        sent += 1
        struct.pack_into("!H", template, 0, next_id)
        sent_at[next_id] = time.perf_counter()
        sock.send(template)
        next_id = (next_id + 1) & 0xFFFF

    outstanding = 0
    deadline = time.perf_counter() + seconds
    while outstanding < inflight:
        send()
        outstanding += 1
    while True:
        try:
            data = sock.recv(65535)
        except TimeoutError:
            lost += outstanding  # everything outstanding was dropped somewhere: start the window again
            outstanding = 0
            if time.perf_counter() >= deadline:
                break
            while outstanding < inflight:
                send()
                outstanding += 1
            continue
        now = time.perf_counter()
        (ident, flags) = struct.unpack_from("!HH", data)
        latencies.append(now - sent_at[ident])
        truncated += bool(flags & 0x0200)
        outstanding -= 1
        if now < deadline:
            send()
            outstanding += 1
        elif outstanding == 0:
            break
    sock.close()
    return {"answers": len(latencies), "lost": lost, "truncated": truncated, "latencies_s": latencies}


def serial_writes(client: SyncClient, seconds: float) -> list[float]:
    out = []
    end = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < end:
        start = time.perf_counter()
        client.call("key_put", {"key": "bench/dns", "value": str(i)})
        out.append(time.perf_counter() - start)
        i += 1
    return sorted(out)


def run_case(cluster: DnsCluster, client: SyncClient, node: BenchNode, name: str, qtype: str,
             args: argparse.Namespace) -> dict[str, Any]:
    dns_addr = cluster.dns_addr(node)
    cmd = [sys.executable, "-m", "bench.dns", "--worker", f"{dns_addr[0]}:{dns_addr[1]}",
           f"{name}.service.consul.", qtype, str(args.seconds), str(args.inflight), str(args.rate / args.workers)]
    cpu0 = cpu_seconds(node.pid)
    t0 = time.perf_counter()
    workers = [subprocess.Popen(cmd, stdout=subprocess.PIPE) for _ in range(args.workers)]
    time.sleep(min(0.5, args.seconds / 4))  # the workers are up and sending before the writes start
    writes = serial_writes(client, args.seconds * 0.6)
    results = []
    for proc in workers:
        out, _ = proc.communicate(timeout=args.seconds + 30)
        results.append(json.loads(out))
    wall = time.perf_counter() - t0
    cpu = cpu_seconds(node.pid) - cpu0
    latencies = sorted(x for r in results for x in r["latencies_s"])
    answers = len(latencies)
    return {
        "name": name, "qtype": qtype, "workers": args.workers, "inflight": args.inflight, "rate_offered": args.rate,
        "queries_per_s": answers / args.seconds,
        "answers": answers, "lost": sum(r["lost"] for r in results),
        "truncated": sum(r["truncated"] for r in results),
        "p50_ms": percentile(latencies, 0.50) * 1000, "p99_ms": percentile(latencies, 0.99) * 1000,
        "node_cpu_cores": cpu / wall, "node_cpu_us_per_query": cpu / max(1, answers) * 1e6,
        "raft_write_p50_ms": percentile(writes, 0.50) * 1000, "raft_write_p99_ms": percentile(writes, 0.99) * 1000,
        "raft_writes": len(writes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--inflight", type=int, default=64)
    parser.add_argument("--rate", type=float, default=0.0,
                        help="Queries/s offered in all (0: as many as the workers can); the Raft latency under a "
                             "given load, rather than at saturation.")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", nargs=6, metavar=("HOST:PORT", "NAME", "QTYPE", "SECONDS", "INFLIGHT", "RATE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        addr, name, qtype, seconds, inflight, rate = args.worker
        host, _, port = addr.rpartition(":")
        json.dump(worker(host, int(port), name, qtype, float(seconds), int(inflight), float(rate)), sys.stdout)
        return
    out_dir = args.out or Path("bench/results") / time.strftime("dns-%Y%m%d-%H%M%S")
    cluster = DnsCluster(size=3)
    rows: list[dict[str, Any]] = []
    try:
        leader = cluster.node(cluster.start())
        with SyncClient(cluster.endpoints, timeout_s=10.0) as client:
            for i in range(10):
                client.register("svc10", f"i{i}", f"10.0.0.{i + 1}", 8000 + i)
            for i in range(100):
                client.register("svc100", f"i{i}", f"10.1.0.{i + 1}", 8000 + i)
            idle = serial_writes(client, min(3.0, args.seconds))
            baseline = {"raft_write_p50_ms": percentile(idle, 0.5) * 1000,
                        "raft_write_p99_ms": percentile(idle, 0.99) * 1000, "raft_writes": len(idle)}
            for name, qtype in CASES:
                rows.append(run_case(cluster, client, leader, name, qtype, args))
    finally:
        cluster.stop()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "dns.json").write_text(json.dumps({"baseline": baseline, "cases": rows}, indent=2))
    print(f"serial writes with no DNS load: p50 {baseline['raft_write_p50_ms']:.2f} ms, "
          f"p99 {baseline['raft_write_p99_ms']:.2f} ms ({baseline['raft_writes']} writes)")
    print("| service | type | q/s | p50 ms | p99 ms | node CPU µs/query | node cores | truncated | lost "
          "| write p50 ms | write p99 ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['qtype']} | {r['queries_per_s']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
              f"| {r['node_cpu_us_per_query']:.1f} | {r['node_cpu_cores']:.2f} | {r['truncated']} | {r['lost']} "
              f"| {r['raft_write_p50_ms']:.2f} | {r['raft_write_p99_ms']:.2f} |")
    print(f"written {out_dir / 'dns.json'}")


if __name__ == "__main__":
    main()
