"""Fuzz the parts that read untrusted input (issue #20): see tests/fuzz/README.md.

Slow on purpose: every test here is ``@pytest.mark.slow``; ``FUZZ_EXAMPLES``
sets the examples per target (default 300).
"""

from __future__ import annotations

import pickle
import socket
import struct
import time
import zlib
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from registry.errors import RegistryError
from registry.fsm.commands import OPS, validate_command
from registry.fsm.state import RegistryState
from registry.protocol import PROTOCOL_VERSION, BadMessage, Closed, Hello, NeedData, ServerConnection
from registry.protocol.frames import FrameDecoder
from registry.raft.cipher import RaftCipher
from registry.raft.tcp import GuardedTcpConnection, RaftWireLimits, WireCounters
from tests.fuzz.campaign import EXAMPLES, for_a_while

pytestmark = pytest.mark.slow

FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=False)

# -- values: msgpack-able data of every shape, some of it close to real commands ----------------

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
                    st.floats(allow_nan=True), st.text(max_size=40), st.binary(max_size=40))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                      st.dictionaries(st.text(max_size=12), inner, max_size=5)),
                      max_leaves=20)
names = st.sampled_from(["web", "db", "a", "", "x" * 300, "web*", "k/1", "_cluster/members/x", "\x1b[2J"])
fields = st.sampled_from(["service", "id", "address", "port", "key", "value", "lease", "ttl_ms", "name", "meta",
                          "tags", "status", "weight", "holder", "rid", "auth", "now_ms", "epoch", "leases",
                          "if_mod_revision", "note", "roles", "token_id", "secret_hash", "login", "expires_ms"])
field_values = st.one_of(values, names, st.integers(min_value=-5, max_value=70_000))
commands = st.builds(
    lambda op, args: {"op": op, **args},
    st.sampled_from(sorted(OPS)),
    st.dictionaries(fields, field_values, max_size=8),
)


def _frame(value: Any) -> bytes:
    body: bytes = msgpack.packb(value, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


#: A hello the server accepts, so the requests after it reach the request parser.
HELLO = _frame(Hello(version=PROTOCOL_VERSION, token=None, client="fuzz").to_wire())
requests = st.builds(lambda i, op, args: _frame({"t": "req", "id": i, "op": op, "args": args}),
                     st.integers(min_value=-1, max_value=2**33), st.one_of(st.sampled_from(sorted(OPS)), names),
                     values)


@pytest.mark.slow
@for_a_while
@FUZZ
@given(st.lists(st.binary(max_size=200), max_size=10))
def test_frame_decoder_never_raises_but_typed_errors(chunks: list[bytes]) -> None:
    decoder = FrameDecoder(4096)
    for chunk in chunks:
        decoder.feed(chunk)
        try:
            while decoder.next_frame() is not None:
                pass
        except RegistryError:
            return


@pytest.mark.slow
@for_a_while
@FUZZ
@given(st.booleans(), st.lists(st.one_of(st.binary(max_size=200), values.map(_frame), requests), max_size=10))
def test_server_protocol_never_raises_but_typed_errors(hello_first: bool, chunks: list[bytes]) -> None:
    conn = ServerConnection(frame_bytes_max=4096)
    for chunk in ([HELLO] if hello_first else []) + chunks:
        if not chunk:
            continue  # b"" is EOF, after which the server feeds nothing more
        conn.receive_data(chunk)
        while True:
            try:
                event = conn.next_event()
            except RegistryError:
                return
            if isinstance(event, NeedData | Closed):
                break
            if isinstance(event, BadMessage) and event.id is None:
                return


@pytest.mark.slow
@for_a_while
@FUZZ
@given(commands)
def test_validator_refuses_with_typed_errors_and_is_a_fixed_point(command: dict[str, Any]) -> None:
    try:
        valid = validate_command(command)
    except RegistryError:
        return
    assert validate_command(dict(valid)) == valid


@pytest.mark.slow
@for_a_while
@FUZZ
@given(st.lists(commands, max_size=25), st.integers(min_value=0, max_value=25))
def test_apply_keeps_invariants_and_a_restored_replica_agrees(cmds: list[dict[str, Any]], cut: int) -> None:
    state = RegistryState()
    replica: RegistryState | None = None
    for i, command in enumerate(cmds):
        if i == cut:
            replica = RegistryState.restore(state.snapshot())
        for target in (state, replica):
            if target is None:
                continue
            try:
                target.apply(dict(command))
            except RegistryError:
                pass
        state.check_invariants()
    if replica is not None:
        assert replica.snapshot() == state.snapshot()


@pytest.mark.slow
@for_a_while
@FUZZ
@given(st.lists(commands, max_size=15), st.data())
def test_snapshot_loader_refuses_corruption_with_bad_request(cmds: list[dict[str, Any]], data: st.DataObject) -> None:
    state = RegistryState()
    for command in cmds:
        try:
            state.apply(dict(command))
        except RegistryError:
            pass
    snap = bytearray(state.snapshot())
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        at = data.draw(st.integers(min_value=0, max_value=len(snap) - 1))
        snap[at] = data.draw(st.integers(min_value=0, max_value=255))
    try:
        restored = RegistryState.restore(bytes(snap))
    except RegistryError:
        return
    restored.check_invariants()


class _Poller:
    def __init__(self) -> None:
        self.handlers: dict[int, Any] = {}

    def subscribe(self, descr: int, callback: Any, event_mask: int) -> None:
        self.handlers[descr] = callback

    def unsubscribe(self, descr: int) -> None:
        self.handlers.pop(descr, None)


KEY = "fuzz-cluster-key-0123456789"
SENDER = RaftCipher(KEY, "127.0.0.1:7101", "a" * 32)


def _raft_frame(obj: Any) -> bytes:
    token = SENDER.encrypt_at_time(zlib.compress(pickle.dumps(obj)), int(time.monotonic()))
    return struct.pack("i", len(token)) + token


@pytest.mark.slow
@for_a_while
@FUZZ
@given(st.lists(st.one_of(st.binary(max_size=300), st.builds(_raft_frame, values),
                          st.binary(max_size=8).map(lambda b: struct.pack("i", 1 << 30) + b)), max_size=8))
def test_raft_receiver_closes_instead_of_crashing(chunks: list[bytes]) -> None:
    peer, mine = socket.socketpair()
    mine.setblocking(False)
    poller = _Poller()
    conn = GuardedTcpConnection(poller=poller, socket=mine, timeout=30.0, limits=RaftWireLimits(),
                                counters=WireCounters())
    conn.encryptor = RaftCipher(KEY, "127.0.0.1:7102", "b" * 32)
    received: list[Any] = []
    conn.setOnMessageReceivedCallback(received.append)
    try:
        for chunk in chunks:
            try:
                peer.sendall(chunk)
            except OSError:
                break
            handler = poller.handlers.get(mine.fileno())
            if handler is None:
                break  # the connection closed itself
            handler(mine.fileno(), 1)
    finally:
        conn.disconnect()
        mine.close()
        peer.close()
