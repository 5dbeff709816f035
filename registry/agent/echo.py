"""A tiny TCP service for the demo, the tests and the benchmark: ``python -m registry.agent.echo``.

Line protocol, one connection at a time per client, any number of lines:

- ``TEXT\\n``        -> ``NAME TEXT\\n`` (so the caller learns which instance answered)
- ``SOURCE N\\n``    -> N bytes, then the server closes (download throughput)
- ``SINK\\n``        -> reads everything until the client's EOF, then ``NAME N\\n`` (upload throughput)

``--health-port`` adds an HTTP server (aiohttp) with ``GET /health`` (200,
or 503 after ``POST /health/fail`` until ``POST /health/ok``), so a health
check can be made to fail without killing the process.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import cast

from aiohttp import web

__all__ = ["EchoProtocol", "serve"]

#: A line longer than this is not a command: the connection is closed.
LINE_BYTES_MAX = 64 * 1024
#: Largest SOURCE answer (bounds what one request can make the server send).
SOURCE_BYTES_MAX = 1 << 34
_CHUNK = b"x" * (1 << 16)


class EchoProtocol(asyncio.Protocol):
    def __init__(self, name: str) -> None:
        self.name = name.encode()
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.sinking = False
        self.sunk = 0
        self._source: asyncio.Task[None] | None = None
        self._can_write = asyncio.Event()
        self._can_write.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but are one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.sinking:
            self.sunk += len(data)
            return
        self.buffer += data
        while not self.sinking:
            line, sep, rest = self.buffer.partition(b"\n")
            if not sep:
                if len(self.buffer) > LINE_BYTES_MAX:
                    self.transport.close()
                return
            self.buffer = rest
            self._line(line.rstrip(b"\r"))
        if self.sinking:
            self.sunk += len(self.buffer)
            self.buffer = b""

    def _line(self, line: bytes) -> None:
        assert self.transport is not None
        if line == b"SINK":
            self.sinking = True
        elif line.startswith(b"SOURCE ") and line[7:].isdigit():
            self.transport.pause_reading()
            self._source = asyncio.get_running_loop().create_task(self._send(min(int(line[7:]), SOURCE_BYTES_MAX)))
        else:
            self.transport.write(self.name + b" " + line + b"\n")

    async def _send(self, count: int) -> None:
        assert self.transport is not None
        while count > 0 and not self.transport.is_closing():
            await self._can_write.wait()
            n = min(count, len(_CHUNK))
            self.transport.write(_CHUNK[:n])
            count -= n
        self.transport.close()

    def eof_received(self) -> bool:
        assert self.transport is not None
        if self.sinking:
            self.transport.write(self.name + b" " + str(self.sunk).encode() + b"\n")
        self.transport.close()
        return False

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self._can_write.set()
        if self._source is not None:
            self._source.cancel()


async def serve(name: str, host: str, port: int, health_port: int | None = None) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: EchoProtocol(name), host, port, reuse_address=True, backlog=4096)
    runner: web.AppRunner | None = None
    if health_port is not None:
        healthy = [True]

        async def health(request: web.Request) -> web.Response:
            return web.Response(text="ok\n" if healthy[0] else "failing\n", status=200 if healthy[0] else 503)

        async def set_health(request: web.Request) -> web.Response:
            healthy[0] = request.match_info["state"] == "ok"
            return web.Response(text="set\n")

        app = web.Application()
        app.router.add_get("/health", health)
        app.router.add_post("/health/{state:ok|fail}", set_health)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, health_port, reuse_address=True).start()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"echo {name} listening on {host}:{port}", flush=True)
    try:
        await stop.wait()
    finally:
        server.close()
        if runner is not None:
            await runner.cleanup()


def main() -> None:
    import uvloop

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--name", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--health-port", type=int, default=None)
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args.name, args.host, args.port, args.health_port))


if __name__ == "__main__":
    main()
