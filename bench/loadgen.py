"""One benchmark driver process: N in-flight requests over a few client connections.

Run by ``run.py`` as ``python bench/loadgen.py SPEC_JSON``.  Protocol on
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
from collections.abc import Awaitable, Callable
from typing import Any, TypedDict

import uvloop

from registry.client import Client
from registry.errors import RegistryError

__all__ = ["DriverSpec", "WORKLOADS"]

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


Op = Callable[[Client, int], Awaitable[Any]]


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


WORKLOADS: dict[str, Callable[[int], Op]] = {
    "register": _register_op,
    "get_linearizable": lambda driver: _read_op("linearizable"),
    "get_stale": lambda driver: _read_op("stale"),
}


async def _drive(spec: DriverSpec) -> dict[str, Any]:
    endpoints = spec["endpoints"]
    driver = spec["driver_index"]
    op = WORKLOADS[spec["workload"]](driver)
    # Client j of driver d starts at node first_node + j + d (mod 3): the connections spread over
    # all nodes, and the first one goes to the leader (so concurrency 1 measures the leader path).
    n = len(endpoints)
    starts = [(spec["first_node"] + j + driver) % n for j in range(spec["clients"])]
    clients = [Client(endpoints[s:] + endpoints[:s], timeout_s=10.0, client_name=f"bench-{driver}-{j}")
               for j, s in enumerate(starts)]
    for client in clients:
        await client.call("status", {})
    loop = asyncio.get_running_loop()
    print("READY", flush=True)
    line = await loop.run_in_executor(None, sys.stdin.readline)
    start = float(line)
    window_start = start + spec["warmup_s"]
    window_end = window_start + spec["duration_s"]
    await asyncio.sleep(max(0.0, start - time.monotonic()))

    latencies: list[int] = []
    errors: Counter[str] = Counter()
    counter = iter(range(driver << 40, (driver + 1) << 40))
    now = time.monotonic

    async def worker(client: Client) -> None:
        record = latencies.append
        while True:
            began = now()
            if began >= window_end:
                return
            try:
                await op(client, next(counter))
            except RegistryError as err:
                if began >= window_start:
                    errors[err.code] += 1
                continue
            ended = now()
            if window_start <= ended <= window_end:
                record(int((ended - began) * 1e6))

    await asyncio.gather(*(worker(clients[w % len(clients)]) for w in range(spec["concurrency"])))
    for client in clients:
        await client.close()
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
