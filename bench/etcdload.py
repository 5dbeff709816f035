"""The etcd side of the benchmark workloads, through the v3 JSON gateway (``httpclient``).

What one op is, next to ours (``loadgen.py``):

* ``register`` -> ``PUT /bench/<service>/<instance>`` with a JSON value shaped like our instance
  record (address, port, tags, meta with a sequence number), cycling over the same 16 x 4096 ids;
* ``get_linearizable`` -> a range over the 3 keys under ``/bench-read/`` (etcd's default
  linearizable read: ReadIndex on the leader); ``get_stale`` -> the same with ``serializable``;
* ``lease_keepalive`` -> ``POST /v3/lease/keepalive {"ID": id}``.  In gRPC a keepalive is a message
  on a long-lived bidirectional stream; through the gateway each POST opens a stream, sends one
  keepalive and closes it, so etcd pays a little per-stream set-up we do not.  That is the
  gateway's cost, and said in the report;
* watch: ``POST /v3/watch`` with a create request on the service's prefix; the gateway answers
  with a chunked stream of JSON lines, one connection per watcher (see ``watch_timestamps``).

An HTTP error status or an ``error`` member in the JSON counts as an error with its code.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from bench.httpclient import HttpConnection

__all__ = ["EtcdError", "check_reply", "connect", "etcd_op", "lease_grant", "prefix_end", "put_json",
           "watch_timestamps"]

READ_PREFIX = b"/bench-read/"


class EtcdError(Exception):
    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def prefix_end(prefix: bytes) -> bytes:
    """The range end covering every key with ``prefix`` (etcd's convention: last byte + 1)."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


def check_reply(status: int, body: bytes) -> dict[str, Any]:
    """The reply's message (a streamed RPC's ``result`` unwrapped); ``EtcdError("http_<status>")`` for an error."""
    try:
        doc: dict[str, Any] = json.loads(body)
    except ValueError:
        raise EtcdError(f"http_{status}", body[:120].decode(errors="replace")) from None
    # Streamed RPCs (keepalive) wrap the message in {"result": ...} or {"error": ...}.
    error = doc.get("error")
    if status != 200 or error:
        # A unary error is {"error": text, "code": grpc code} with the HTTP status; a streamed one has no status.
        code = error.get("http_code", status) if isinstance(error, dict) else status
        message = error.get("message", "") if isinstance(error, dict) else str(error or doc.get("message", ""))
        raise EtcdError(f"http_{code}", message)
    result = doc.get("result")
    return result if isinstance(result, dict) else doc


async def call(conn: HttpConnection, path: str, doc: dict[str, Any]) -> dict[str, Any]:
    status, body = await conn.post(path, json.dumps(doc).encode())
    return check_reply(status, body)


async def connect(endpoints: list[str], count: int, first: int = 0) -> list[HttpConnection]:
    """``count`` connections, connection j to endpoint (first + j) mod len(endpoints)."""
    return [await HttpConnection.open(endpoints[(first + j) % len(endpoints)]) for j in range(count)]


async def put_json(conn: HttpConnection, key: str, value: dict[str, Any], lease: int | None = None) -> None:
    doc: dict[str, Any] = {"key": b64(key.encode()), "value": b64(json.dumps(value).encode())}
    if lease is not None:
        doc["lease"] = str(lease)
    await call(conn, "/v3/kv/put", doc)


async def lease_grant(conn: HttpConnection, ttl_s: int) -> int:
    return int((await call(conn, "/v3/lease/grant", {"TTL": ttl_s}))["ID"])


EtcdOp = Callable[[HttpConnection, int], Awaitable[Any]]


def etcd_op(workload: str, driver: int, services: int, instance_ids: int, leases: list[int]) -> EtcdOp:
    """The op for ``workload``: (connection, sequence number) -> awaitable."""
    if workload == "register":
        async def put(conn: HttpConnection, n: int) -> Any:
            service, iid = f"bench-{n % services}", f"d{driver}-i{n % instance_ids}"
            record = {"service": service, "id": iid, "address": "10.0.0.1", "port": 8000 + n % 1000,
                      "meta": {"zone": "a", "seq": str(n)}, "tags": ["bench"], "status": "passing"}
            return await put_json(conn, f"/bench/{service}/{iid}", record)

        return put
    if workload in ("get_linearizable", "get_stale"):
        read = json.dumps({"key": b64(READ_PREFIX), "range_end": b64(prefix_end(READ_PREFIX)),
                           "serializable": workload == "get_stale"}).encode()

        async def get(conn: HttpConnection, n: int) -> Any:
            status, body = await conn.post("/v3/kv/range", read)
            return check_reply(status, body)

        return get
    if workload == "lease_keepalive":
        bodies = [json.dumps({"ID": str(lease)}).encode() for lease in leases]

        async def keepalive(conn: HttpConnection, n: int) -> Any:
            status, body = await conn.post("/v3/lease/keepalive", bodies[n % len(bodies)])
            result = check_reply(status, body)
            if "TTL" not in result:  # etcd answers an unknown or expired lease with no TTL
                raise EtcdError("lease_not_found")
            return result

        return keepalive
    raise ValueError(f"no etcd op for workload {workload!r}")


async def watch_timestamps(conn: HttpConnection, prefix: str) -> AsyncIterator[tuple[str, list[float | None]]]:
    """Watch ``prefix`` on one connection: yields ("created", []) then ("events", [ts or None per event]).

    ``ts`` is the ``ts`` member of the JSON value the writer put (its send time), as in ``watch.py``.
    One watch per connection: the gateway decodes a request body as a sequence of WatchRequests, but Go's
    HTTP/1 server stops reading the body once the response has begun, so further creates can be lost.
    """
    key = prefix.encode()
    request = json.dumps({"create_request": {"key": b64(key), "range_end": b64(prefix_end(key))}}).encode()
    async for line in conn.post_stream("/v3/watch", request):
        doc = json.loads(line)
        result = doc.get("result") or {}
        if doc.get("error"):
            raise EtcdError("watch_error", str(doc["error"]))
        if result.get("created"):
            yield "created", []
        events = result.get("events")
        if events:
            stamps: list[float | None] = []
            for event in events:
                try:
                    value = json.loads(base64.b64decode(event["kv"]["value"]))
                    stamps.append(float(value["ts"]))
                except (KeyError, ValueError, TypeError):
                    stamps.append(None)
            yield "events", stamps
