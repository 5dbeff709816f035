"""One benchmark driver process: N in-flight requests over a few client connections.

Run by ``run.py`` as ``python -m bench.loadgen SPEC_JSON``.  Protocol on
stdio: the driver connects its clients and prints ``READY``; the parent
writes one line holding the ``time.monotonic()`` instant the load starts
(the clock is system-wide on Linux, so parent and drivers agree).  The
driver then keeps ``concurrency`` requests in flight until the end of the
measurement window and writes ``result_path``: JSON with the completions
inside the window: count, latencies (microseconds) and errors by code.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NotRequired, TypedDict, TypeVar

import uvloop

from bench import etcdload
from bench.httpclient import HttpError
from registry.client import Client
from registry.errors import RegistryError

__all__ = ["DriverSpec", "WORKLOADS", "closed_loop", "etcd_error_code", "registry_error_code"]

T = TypeVar("T")

#: Register ops cycle over this many instance ids per driver and this many
#: services, so the registry keeps a realistic, bounded size (every op still
#: changes its record: the metadata carries the op's sequence number).
INSTANCE_IDS = 4096
SERVICES = 16
READ_SERVICE = "bench-read"


class DriverSpec(TypedDict):
    endpoints: list[str]
    workload: str
    concurrency: int
    clients: int
    warmup_s: float
    duration_s: float
    driver_index: int
    #: Index in ``endpoints`` of the node the first connection goes to (run.py: the leader).
    first_node: int
    result_path: str
    #: "registry" (ours, the default) or "etcd" (its JSON gateway, one HTTP connection per request in flight).
    system: NotRequired[str]
    #: lease_keepalive: how many leases to renew round-robin, and a file that keeps their ids between runs
    #: (granted by the first run on a cluster, reused by the repeats).
    leases: NotRequired[int]
    leases_file: NotRequired[str]
    #: The token of every request (a cluster run with --acl).
    token: NotRequired[str]


Op = Callable[[Client, int], Awaitable[Any]]
#: Lease TTL of the keepalive workload, on both systems: longer than any benchmark run (the leases are granted once
#: per cluster and reused by every repeat, and a run may renew only some of them).
LEASE_TTL_S = 3600


def _register_op(driver: int) -> Op:
    async def op(client: Client, n: int) -> Any:
        return await client.register(
            f"bench-{n % SERVICES}", f"d{driver}-i{n % INSTANCE_IDS}", "10.0.0.1", 8000 + n % 1000,
            meta={"zone": "a", "seq": str(n)}, tags=["bench"],
        )

    return op


def _read_op(consistency: str) -> Op:
    async def op(client: Client, n: int) -> Any:
        return await client.get_service(READ_SERVICE, consistency=consistency)

    return op


def keepalive_op(leases: list[int]) -> Op:
    async def op(client: Client, n: int) -> Any:
        # No retries: a refusal (not leader, ...) counts as an error instead of hiding in the latency.
        return await client.call("lease_keepalive", {"lease": leases[n % len(leases)]}, timeout_s=10.0, retry=False)

    return op


WORKLOADS: dict[str, Callable[[int], Op]] = {
    "register": _register_op,
    "get_linearizable": lambda driver: _read_op("linearizable"),
    "get_stale": lambda driver: _read_op("stale"),
    # Needs the leases: built in _drive (lease_keepalive talks to the leader only: keepalives are leader-local).
    "lease_keepalive": lambda driver: keepalive_op([]),
}


async def closed_loop(op: Callable[[T, int], Awaitable[Any]], conns: Sequence[T], concurrency: int,
                      window_start: float, window_end: float, counter: Iterator[int],
                      error_code: Callable[[BaseException], str | None]) -> tuple[list[int], Counter[str]]:
    """``concurrency`` workers, worker w issuing ops on ``conns[w % len(conns)]`` back to back until
    ``window_end``; returns the latencies (µs) of the ops completed inside [window_start, window_end]
    and the errors (by ``error_code``) of ops begun inside it.  ``error_code`` returns None for an
    exception that is not a request error (it then propagates).
    """
    latencies: list[int] = []
    errors: Counter[str] = Counter()
    now = time.monotonic

    async def worker(conn: T) -> None:
        record = latencies.append
        while True:
            began = now()
            if began >= window_end:
                return
            try:
                await op(conn, next(counter))
            except Exception as err:
                code = error_code(err)
                if code is None:
                    raise
                if began >= window_start:
                    errors[code] += 1
                continue
            ended = now()
            if window_start <= ended <= window_end:
                record(int((ended - began) * 1e6))

    await asyncio.gather(*(worker(conns[w % len(conns)]) for w in range(concurrency)))
    return latencies, errors


def registry_error_code(err: BaseException) -> str | None:
    return err.code if isinstance(err, RegistryError) else None


def etcd_error_code(err: BaseException) -> str | None:
    if isinstance(err, etcdload.EtcdError):
        return err.code
    if isinstance(err, HttpError | OSError):
        return "connection"
    return None


async def _leases(spec: DriverSpec, grant: Callable[[int], Awaitable[int]], width: int) -> list[int]:
    """The keepalive workload's leases: from ``leases_file`` if an earlier run granted them, else granted now."""
    path = Path(spec.get("leases_file", ""))
    if spec.get("leases_file") and path.exists():
        ids: list[int] = json.loads(path.read_text())
        return ids
    ids = []

    async def worker(w: int, count: int) -> None:
        for _ in range(count):
            ids.append(await grant(w))

    # ``width`` grants in flight (grant(w) must be safe beside grant(v) for v != w): setup, not measured.
    total = spec.get("leases", 1000)
    await asyncio.gather(*(worker(w, total // width + (1 if w < total % width else 0)) for w in range(width)))
    if spec.get("leases_file"):
        path.write_text(json.dumps(ids))
    return ids


async def _await_start(spec: DriverSpec) -> tuple[float, float]:
    """Say READY, read the start instant from the parent, sleep until it; return the window."""
    loop = asyncio.get_running_loop()
    print("READY", flush=True)
    line = await loop.run_in_executor(None, sys.stdin.readline)
    start = float(line)
    window_start = start + spec["warmup_s"]
    await asyncio.sleep(max(0.0, start - time.monotonic()))
    return window_start, window_start + spec["duration_s"]


async def _drive_registry(spec: DriverSpec, counter: Iterator[int]) -> tuple[list[int], Counter[str]]:
    endpoints = spec["endpoints"]
    driver = spec["driver_index"]
    op = WORKLOADS[spec["workload"]](driver)
    # Client j of driver d starts at node first_node + j + d (mod 3): the connections spread over
    # all nodes, and the first one goes to the leader (so concurrency 1 measures the leader path).
    n = len(endpoints)
    starts = [(spec["first_node"] + j + driver) % n for j in range(spec["clients"])]
    if spec["workload"] == "lease_keepalive":
        starts = [spec["first_node"]] * spec["clients"]  # keepalives are leader-local: no follower hop
    clients = [Client(endpoints[s:] + endpoints[:s], timeout_s=10.0, client_name=f"bench-{driver}-{j}",
                      token=spec.get("token"))
               for j, s in enumerate(starts)]
    for client in clients:
        await client.call("status", {})
    if spec["workload"] == "lease_keepalive":
        op = keepalive_op(await _leases(spec, lambda w: clients[w % len(clients)].lease_grant(LEASE_TTL_S * 1000), 32))
    window_start, window_end = await _await_start(spec)
    try:
        return await closed_loop(op, clients, spec["concurrency"], window_start, window_end, counter,
                                 registry_error_code)
    finally:
        for client in clients:
            await client.close()


async def _drive_etcd(spec: DriverSpec, counter: Iterator[int]) -> tuple[list[int], Counter[str]]:
    endpoints = spec["endpoints"]
    driver = spec["driver_index"]
    # HTTP/1.1 without pipelining: one connection per request in flight, spread over the members like
    # our clients (the first to the leader); keepalives all go to the leader, as ours do.
    if spec["workload"] == "lease_keepalive":
        endpoints = [endpoints[spec["first_node"]]]
    conns = await etcdload.connect(endpoints, spec["concurrency"], spec["first_node"] + driver)
    leases: list[int] = []
    if spec["workload"] == "lease_keepalive":
        leases = await _leases(spec, lambda w: etcdload.lease_grant(conns[w], LEASE_TTL_S), min(32, len(conns)))
    op = etcdload.etcd_op(spec["workload"], driver, SERVICES, INSTANCE_IDS, leases)
    window_start, window_end = await _await_start(spec)
    try:
        return await closed_loop(op, conns, spec["concurrency"], window_start, window_end, counter, etcd_error_code)
    finally:
        for conn in conns:
            await conn.close()


async def _drive(spec: DriverSpec) -> dict[str, Any]:
    driver = spec["driver_index"]
    counter = iter(range(driver << 40, (driver + 1) << 40))
    drive = _drive_etcd if spec.get("system", "registry") == "etcd" else _drive_registry
    latencies, errors = await drive(spec, counter)
    return {"ops": len(latencies), "latency_us": latencies, "errors": dict(errors),
            "window_s": spec["duration_s"]}


def main() -> None:
    spec: DriverSpec = json.loads(sys.argv[1])
    uvloop.install()
    result = asyncio.run(_drive(spec))
    # A file, not stdout: the result can be megabytes, more than a pipe write is sure to take at exit.
    with open(spec["result_path"] + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(spec["result_path"] + ".tmp", spec["result_path"])


if __name__ == "__main__":
    main()
