"""``regctl server`` with a stage clock: the node process of ``python -m bench.timeline``.

Wraps the functions a write passes through (the socket read, the
proposer, pysyncobj's poll, the log's append and sync, the Raft
transport's send and receive, the apply, the answer) so that each call
records ``(time.monotonic_ns(), thread, stage)``; CLOCK_MONOTONIC is one
clock for every process on the machine, so the three nodes' records line
up.  Nothing in ``registry/`` knows about it: the wrapping happens here,
before the CLI runs, so it needs the pure-Python build (a mypyc-compiled
class cannot be patched; the stages are the same in both builds).

``TIMELINE_OUT``: the directory the records go to (``<node id>.msgpack``), written at exit.
"""

from __future__ import annotations

import atexit
import functools
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack

Record = tuple[int, str, str]


def _thread_label(main_ident: int) -> str:
    ident = threading.get_ident()
    if ident == main_ident:
        return "loop"
    name = threading.current_thread().name
    return "raft" if name.startswith("Thread") else name  # pysyncobj's thread has no name of its own


def install(records: list[Record]) -> None:
    """Wrap the stage functions; each call appends to ``records``."""
    from pysyncobj import poller

    from registry.build import build_kind
    from registry.raft import log as raft_log
    from registry.raft import node as raft_node
    from registry.raft import tcp, transport
    from registry.server import proposer, server

    if build_kind() != "pure":
        sys.exit("bench.timeline needs the pure-Python build (REGISTRY_NO_MYPYC=1 pip install -e .): "
                 "compiled classes cannot be wrapped")
    main_ident = threading.get_ident()
    clock = time.monotonic_ns
    add = records.append

    def mark(cls: Any, name: str, stage: str | Callable[..., str], *, exit_stage: str | None = None) -> None:
        original = getattr(cls, name)

        @functools.wraps(original)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            label = stage if isinstance(stage, str) else stage(*args, **kwargs)
            add((clock(), _thread_label(main_ident), label))
            try:
                return original(*args, **kwargs)
            finally:
                if exit_stage is not None:
                    add((clock(), _thread_label(main_ident), exit_stage))

        setattr(cls, name, wrapped)

    def message_type(prefix: str) -> Callable[..., str]:
        def label(self: Any, node: Any, message: Any, *rest: Any, **kwargs: Any) -> str:
            kind = message.get("type") if isinstance(message, dict) else type(message).__name__
            return f"{prefix}:{kind}"

        return label

    # The loop thread: request in, proposal out, outcome back, answer out.
    mark(server._ClientProtocol, "data_received", "read")
    mark(proposer.Proposer, "_send_one", "seal")
    mark(raft_node.RaftNode, "submit", "submit")
    mark(proposer.Proposer, "_complete", "complete")
    mark(server._ClientProtocol, "_write_bytes", "answer")
    mark(server._ClientProtocol, "_flush_streams", "flush")
    # The Raft thread: the wait for events, the log, the wire, the apply.
    for poller_class in (poller.SelectPoller, getattr(poller, "PollPoller", None)):
        if poller_class is not None:
            mark(poller_class, "poll", "wait>", exit_stage="wait<")
    mark(raft_node._SyncObjCore, "_onTick", "tick")
    mark(raft_log.RaftLog, "add", "append")
    mark(raft_log.RaftLog, "sync", "sync>", exit_stage="sync<")
    mark(raft_log.os, "fdatasync", "fdatasync>", exit_stage="fdatasync<")  # in whichever thread runs it
    mark(transport.RaftTransport, "send", message_type("send"), exit_stage="sent")
    mark(tcp.GuardedTcpConnection, "_TcpConnection__processRead", "sockread")
    mark(tcp.GuardedTcpConnection, "_open", "open>", exit_stage="open<")
    mark(raft_node._SyncObjCore, "_SyncObj__onMessageReceived", message_type("recv"))
    mark(raft_node._SyncObjCore, "_apply_batch", "apply>", exit_stage="apply<")


def main() -> None:
    out_dir = os.environ.get("TIMELINE_OUT")
    if not out_dir or "--id" not in sys.argv:
        sys.exit("TIMELINE_OUT must name a directory for the stage records, and --id the node")
    out = os.path.join(out_dir, sys.argv[sys.argv.index("--id") + 1] + ".msgpack")
    records: list[Record] = []
    install(records)
    switch_us = os.environ.get("TIMELINE_SWITCH_US")
    if switch_us:  # an experiment: how much of a step is a wait for the GIL
        sys.setswitchinterval(float(switch_us) / 1e6)

    def dump() -> None:
        with open(out, "wb") as f:
            f.write(msgpack.packb(records, use_bin_type=True))

    atexit.register(dump)
    from cli.main import main as regctl_main

    sys.argv = ["regctl", *sys.argv[1:]]
    regctl_main()


if __name__ == "__main__":
    main()
