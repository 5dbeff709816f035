"""Benchmark the agent's sidecar proxy against a direct connection.

    python -m bench.agent_proxy [--quick] [--duration S] [--concurrency N] [--access-log] [--out FILE]

Starts a three-node cluster (``localcluster.BenchCluster``), one echo
backend (``python -m registry.agent.echo``) registered in it, and one real
``regctl agent --upstream echo=PORT`` process; this process is the load
generator (uvloop).  Everything runs on 127.0.0.1, and every process
started here is stopped on exit, on error and on Ctrl-C.

Measures, each through the proxy and direct to the backend:

- **request latency**: one small request/response (a 6-byte line) at a
  time on one open connection, p50/p99; the difference is the latency the
  proxy adds to a request;
- **connection latency**: connect + one request + close, one at a time,
  p50/p99 (through the proxy this includes the agent's own connect to the
  endpoint);
- **connections/s**: ``--concurrency`` clients each opening a new
  connection per request, for ``--duration`` seconds;
- **MB/s**: one connection downloading (``SOURCE``) and one uploading
  (``SINK``) ``--bulk-mib`` MiB.

Also reports the agent process's CPU per proxied connection.  The
connection test leaves TIME_WAIT sockets behind (about two per connection,
for 60 s): Linux reuses them for loopback connects, but random port probing
by other programs fails more often for that minute.  The load
generator, the backend and the agent share the machine's cores, so on a
small machine the absolute numbers are bounded by the generator; the
*added* latency is the proxy's own cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import FrameType
from typing import Any

from bench.localcluster import BenchCluster, cpu_seconds, machine_busy_seconds, regctl_command
from registry.client import SyncClient

BENCH_DIR = Path(__file__).resolve().parent
from registry.server.ports import free_ports  # noqa: E402

PING = b"ping\n"


def user_system_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process so far, from /proc/PID/stat.

    Split because they answer different questions: user time is the agent's
    own code (Python, uvloop), system time mostly the kernel's TCP work per
    connection (connect, handshake, FIN), which no change to the agent's
    Python can remove.
    """
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    rest = data[data.rindex(b")") + 2 :].split()  # after the command name, which may contain spaces
    tick = os.sysconf("SC_CLK_TCK")
    return int(rest[11]) / tick, int(rest[12]) / tick


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


class _OneShot(asyncio.Protocol):
    """Connect, send one line, wait for the answer line, close: one proxied connection."""

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.done = done
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.write(PING)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.buffer.endswith(b"\n"):
            self.transport.close()
            if not self.done.done():
                self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(exc or ConnectionError("closed before the answer"))


async def one_connection(port: int) -> None:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    await loop.create_connection(lambda: _OneShot(done), "127.0.0.1", port)
    await done


async def request_latency(port: int, count: int) -> list[float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out = []
    for _ in range(count):
        start = time.perf_counter()
        writer.write(PING)
        await reader.readline()
        out.append(time.perf_counter() - start)
    writer.close()
    return out


async def connection_latency(port: int, count: int) -> list[float]:
    out = []
    for _ in range(count):
        start = time.perf_counter()
        await one_connection(port)
        out.append(time.perf_counter() - start)
    return out


async def connection_rate(port: int, concurrency: int, duration_s: float) -> tuple[int, int]:
    end = time.perf_counter() + duration_s
    ok = 0
    failed = 0

    async def worker() -> None:
        nonlocal ok, failed
        while time.perf_counter() < end:
            try:
                await one_connection(port)
                ok += 1
            except OSError:
                failed += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ok, failed


async def download(port: int, size: int) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    start = time.perf_counter()
    writer.write(f"SOURCE {size}\n".encode())
    got = 0
    while data := await reader.read(1 << 20):
        got += len(data)
    elapsed = time.perf_counter() - start
    writer.close()
    assert got == size, (got, size)
    return size / elapsed / 1e6


async def upload(port: int, size: int) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    chunk = b"u" * (1 << 18)
    start = time.perf_counter()
    writer.write(b"SINK\n")
    sent = 0
    while sent < size:
        writer.write(chunk)
        sent += len(chunk)
        await writer.drain()
    writer.write_eof()
    answer = await reader.readline()
    elapsed = time.perf_counter() - start
    writer.close()
    assert answer.split()[-1] == str(sent).encode(), answer
    return sent / elapsed / 1e6


def wait_for(cond: Any, what: str, deadline_s: float = 30.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            if cond():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what}")


async def measure(proxy: int, direct: int, args: argparse.Namespace, agent_pid: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name, port in (("direct", direct), ("proxy", proxy)):
        await request_latency(port, 200)  # warm-up
        req = await request_latency(port, args.requests)
        conn = await connection_latency(port, args.requests // 2)
        results[name] = {
            "request_p50_us": percentile(req, 50) * 1e6, "request_p99_us": percentile(req, 99) * 1e6,
            "connection_p50_us": percentile(conn, 50) * 1e6, "connection_p99_us": percentile(conn, 99) * 1e6,
        }
    for name, port in (("direct", direct), ("proxy", proxy)):
        cpu0, busy0, t0 = cpu_seconds(agent_pid), machine_busy_seconds(), time.perf_counter()
        split0 = user_system_seconds(agent_pid)
        ok, failed = await connection_rate(port, args.concurrency, args.duration)
        elapsed = time.perf_counter() - t0
        cpu1, busy1 = cpu_seconds(agent_pid), machine_busy_seconds()
        split1 = user_system_seconds(agent_pid)
        results[name].update({
            "connections_per_s": ok / elapsed, "connection_failures": failed,
            "machine_cores_busy": (busy1 - busy0) / elapsed,
        })
        if name == "proxy":
            results[name]["agent_cpu_us_per_connection"] = (cpu1 - cpu0) / max(ok, 1) * 1e6
            results[name]["agent_cores_busy"] = (cpu1 - cpu0) / elapsed
            results[name]["agent_user_us_per_connection"] = (split1[0] - split0[0]) / max(ok, 1) * 1e6
            results[name]["agent_system_us_per_connection"] = (split1[1] - split0[1]) / max(ok, 1) * 1e6
        size = args.bulk_mib << 20
        results[name]["download_MBps"] = await download(port, size)
        results[name]["upload_MBps"] = await upload(port, size)
    d, p = results["direct"], results["proxy"]
    results["added"] = {
        "request_p50_us": p["request_p50_us"] - d["request_p50_us"],
        "request_p99_us": p["request_p99_us"] - d["request_p99_us"],
        "connection_p50_us": p["connection_p50_us"] - d["connection_p50_us"],
        "connection_p99_us": p["connection_p99_us"] - d["connection_p99_us"],
    }
    return results


def table(results: dict[str, Any], args: argparse.Namespace) -> str:
    d, p, a = results["direct"], results["proxy"], results["added"]
    rows = [
        ("request latency p50 / p99 (µs)", f"{d['request_p50_us']:.0f} / {d['request_p99_us']:.0f}",
         f"{p['request_p50_us']:.0f} / {p['request_p99_us']:.0f}",
         f"{a['request_p50_us']:+.0f} / {a['request_p99_us']:+.0f}"),
        ("connection latency p50 / p99 (µs)", f"{d['connection_p50_us']:.0f} / {d['connection_p99_us']:.0f}",
         f"{p['connection_p50_us']:.0f} / {p['connection_p99_us']:.0f}",
         f"{a['connection_p50_us']:+.0f} / {a['connection_p99_us']:+.0f}"),
        (f"new connections/s ({args.concurrency} clients)", f"{d['connections_per_s']:.0f}",
         f"{p['connections_per_s']:.0f}", f"agent {p['agent_cpu_us_per_connection']:.0f} µs CPU/conn "
         f"({p['agent_user_us_per_connection']:.0f} user + {p['agent_system_us_per_connection']:.0f} system), "
         f"{p['agent_cores_busy']:.2f} cores"),
        (f"download / upload MB/s ({args.bulk_mib} MiB)", f"{d['download_MBps']:.0f} / {d['upload_MBps']:.0f}",
         f"{p['download_MBps']:.0f} / {p['upload_MBps']:.0f}", ""),
    ]
    lines = ["| measure | direct | through the agent | added / notes |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    fails = d["connection_failures"] + p["connection_failures"]
    lines.append("")
    lines.append(f"connection failures: {fails}; machine: {os.cpu_count()} cores, "
                 f"{p['machine_cores_busy']:.1f} busy during the proxied connections test "
                 "(agent + backend + generator + anything else running); "
                 f"targets: added request p99 < 1000 µs: {'met' if a['request_p99_us'] < 1000 else 'missed'}; "
                 f">= 5000 new connections/s: {'met' if p['connections_per_s'] >= 5000 else 'missed'}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer requests, 2 s of connections, 64 MiB bulk")
    parser.add_argument("--duration", type=float, default=None, help="seconds of new connections (default 3)")
    parser.add_argument("--requests", type=int, default=None, help="requests per latency run (default 5000)")
    parser.add_argument("--concurrency", type=int, default=32, help="clients opening connections (default 32)")
    parser.add_argument("--bulk-mib", type=int, default=None, help="MiB per bulk transfer (default 256)")
    parser.add_argument("--access-log", action="store_true", help="run the agent with an access log")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    # Each connection leaves TIME_WAIT sockets on loopback for 60 s: keep the count moderate.
    args.duration = args.duration or (2.0 if args.quick else 3.0)
    args.requests = args.requests or (1000 if args.quick else 5000)
    args.bulk_mib = args.bulk_mib or (64 if args.quick else 256)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    root = Path(tempfile.mkdtemp(prefix="regbench-agent-"))
    cluster = BenchCluster(root=root / "cluster")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        cluster.start()
        backend_port, proxy_port, http_port = free_ports(3)
        with open(root / "backend.log", "ab") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "registry.agent.echo", "--name", "b1", "--port",
                                           str(backend_port)], stdout=log, stderr=subprocess.STDOUT))
        with SyncClient(cluster.endpoints) as client:
            client.register("echo", "b1", "127.0.0.1", backend_port)
        agent_cmd = [*regctl_command(), "--endpoints", ",".join(cluster.endpoints), "agent", "--upstream",
                     f"echo={proxy_port}", "--http", f"127.0.0.1:{http_port}", "--log-level", "WARNING"]
        if args.access_log:
            agent_cmd += ["--access-log", str(root / "access.log")]
        with open(root / "agent.log", "ab") as log:
            agent = subprocess.Popen(agent_cmd, stdout=log, stderr=subprocess.STDOUT)
        procs.append(agent)

        def ready() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=1) as response:
                return bool(json.loads(response.read())["upstreams"][0]["healthy"] == 1)

        wait_for(ready, "the agent to see the backend")
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            results = runner.run(measure(proxy_port, backend_port, args, agent.pid))
        results["config"] = {"duration_s": args.duration, "requests": args.requests,
                             "concurrency": args.concurrency, "bulk_mib": args.bulk_mib,
                             "access_log": args.access_log, "cores": os.cpu_count()}
        print(table(results, args))
        if args.out is not None:
            args.out.write_text(json.dumps(results, indent=2, sort_keys=True))
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
