"""The mypyc-compiled build behaves exactly like the pure-Python one (issue #24).

Compiled modules check argument types and convert ``bool`` to ``int`` at their
typed boundaries, so a value from outside that reaches a typed parameter
unchecked would raise ``TypeError`` (or turn ``True`` into 1) in one build and
``BadRequest`` in the other.  These tests feed the installed (compiled) codec
and state machine and a pure copy of the same sources the same random frames,
calls and commands, and require identical results, errors included.

The pure copy is the ``.py`` files that ship beside the extensions, loaded
under another package name (``registry.fsm`` -> ``_regpure.fsm``, likewise
``registry.protocol``) so that it imports its own pure modules, not the
compiled ones.  ``registry.errors`` stays shared, so errors compare by class.
Without a compiled build there is nothing to compare and the tests skip.
"""

from __future__ import annotations

import copy
import importlib
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import registry.fsm.state
from registry.errors import RegistryError
from registry.fsm.commands import SCHEMAS

#: The compiled packages: their sources are copied and renamed for the pure side.
_COMPILED_PACKAGES = ("fsm", "protocol")
_PURE_ROOT = "_regpure"

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                             HealthCheck.function_scoped_fixture])


def _is_compiled(module: ModuleType) -> bool:
    return str(module.__file__).endswith((".so", ".pyd"))


pytestmark = pytest.mark.skipif(
    not _is_compiled(registry.fsm.state),
    reason="no mypyc-compiled build installed (registry.fsm.state is pure Python): "
    "`pip install .` with a C compiler and without REGISTRY_NO_MYPYC builds one",
)


@pytest.fixture(scope="module")
def pure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], ModuleType]]:
    """``pure("fsm.state")``: that module imported from its ``.py`` source under ``_regpure``."""
    src_root = Path(registry.fsm.state.__file__).parent.parent
    dest = tmp_path_factory.mktemp("pure") / _PURE_ROOT
    dest.mkdir()
    (dest / "__init__.py").write_text("")
    rename = re.compile(r"\bregistry\.(" + "|".join(_COMPILED_PACKAGES) + r")\b")
    for package in _COMPILED_PACKAGES:
        (dest / package).mkdir()
        sources = sorted((src_root / package).glob("*.py"))
        assert sources, f"no .py sources beside the compiled {package} modules"
        for source in sources:
            (dest / package / source.name).write_text(rename.sub(_PURE_ROOT + r".\1", source.read_text()))
    sys.path.insert(0, str(dest.parent))
    try:
        def load(name: str) -> ModuleType:
            module = importlib.import_module(f"{_PURE_ROOT}.{name}")
            assert not _is_compiled(module)
            return module

        yield load
    finally:
        sys.path.remove(str(dest.parent))
        for name in [n for n in sys.modules if n == _PURE_ROOT or n.startswith(_PURE_ROOT + ".")]:
            del sys.modules[name]


def _outcome(call: Callable[[], Any]) -> Any:
    """What a call did, comparable across builds: its value (events by class name and fields) or its error."""
    try:
        value = call()
    except RegistryError as exc:
        return ("error", type(exc), exc.message)
    except Exception as exc:  # a TypeError from a compiled boundary must show up as a difference
        return ("crash", type(exc).__name__, str(exc))
    return ("ok", _neutral(value))


def _neutral(value: Any) -> Any:
    """Messages of the two builds are different classes: compare their names and fields."""
    if hasattr(value, "__dataclass_fields__"):
        return (type(value).__name__, {k: _neutral(getattr(value, k)) for k in value.__dataclass_fields__})
    if isinstance(value, RegistryError):
        return (type(value), value.message)
    if isinstance(value, list | tuple):
        return [_neutral(v) for v in value]
    if isinstance(value, dict):
        return {k: _neutral(v) for k, v in value.items()}
    if type(value).__name__ in ("NeedData", "Closed"):
        return type(value).__name__
    return (type(value), value)


# -- values from outside: every type msgpack decodes to, bools and edge ints included ------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),  # what msgpack can carry
    st.sampled_from([0, 1, -1, 2**53 - 1, 2**53, 2**63, 2**64 - 1]),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.binary(max_size=4),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=6,
)
_wire_keys = st.sampled_from(["t", "id", "op", "args", "v", "token", "client", "ok", "rev", "body", "err", "node",
                              "code", "message", "x"])
_types = st.sampled_from(["hello", "req", "cancel", "hello_ok", "res", "ev", "end", "bye", "nope"])
_maps = st.dictionaries(_wire_keys, st.one_of(_types, _values,
                                              st.fixed_dictionaries({"code": st.sampled_from(["NOT_FOUND", "X"]),
                                                                     "message": st.text(max_size=3)})),
                        max_size=6)


def _frame(obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return len(body).to_bytes(4, "big") + body


def _drain(conn: Any) -> list[Any]:
    out = []
    for _ in range(64):
        event = conn.next_event()
        out.append(_outcome(lambda e=event: e))
        if type(event).__name__ in ("NeedData", "Closed"):
            break
    return out


def _converse(protocol: Any, side: str, hello_first: bool, chunks: list[bytes]) -> list[Any]:
    conn = protocol.ServerConnection() if side == "server" else protocol.ClientConnection()
    if hello_first:
        if side == "server":
            conn.receive_data(_frame({"t": "hello", "v": 1, "client": "f"}))
        else:
            conn.send(protocol.Hello(1, None, "c"))
            conn.receive_data(_frame({"t": "hello_ok", "v": 1, "node": "n", "rev": 0}))
    trace = []
    for chunk in chunks:
        trace.append(_outcome(lambda c=chunk: conn.receive_data(c)))
        trace.append(_outcome(lambda: _drain(conn)))
    return trace


@SETTINGS
@given(side=st.sampled_from(["server", "client"]), hello_first=st.booleans(),
       frames=st.lists(st.one_of(_maps.map(_frame), _values.map(_frame), st.binary(max_size=12)), max_size=6))
def test_codec_gives_identical_events_and_errors(pure: Callable[[str], ModuleType], side: str,
                                                 hello_first: bool, frames: list[bytes]) -> None:
    import registry.protocol as compiled

    assert _is_compiled(importlib.import_module("registry.protocol.connection"))
    expected = _converse(pure("protocol"), side, hello_first, frames)
    assert _converse(compiled, side, hello_first, frames) == expected


@SETTINGS
@given(request_id=st.one_of(_scalars, st.integers(0, 10)), op=st.one_of(_scalars, st.sampled_from(["get", ""])),
       args=st.one_of(_values, st.dictionaries(st.one_of(st.text(max_size=2), st.integers()), _values, max_size=2)))
def test_client_requests_and_local_sends_identical(pure: Callable[[str], ModuleType], request_id: Any, op: Any,
                                                   args: Any) -> None:
    import registry.protocol as compiled

    def run(protocol: Any) -> list[Any]:
        client = protocol.ClientConnection()
        client.send(protocol.Hello(1, None, "c"))
        server = protocol.ServerConnection()
        server.receive_data(_frame({"t": "hello", "v": 1, "client": "f"}))
        server.next_event()
        server.send(protocol.HelloOk(1, "n", 0))
        return [
            _outcome(lambda: client.send_request(request_id, op, args)),
            _outcome(lambda: server.send(protocol.Response(request_id, 0, body=args))),
            _outcome(lambda: server.send(protocol.StreamEvent(request_id, args))),
            _outcome(lambda: server.send(request_id)),
            _outcome(lambda: client.send(op)),
            _outcome(lambda: protocol.encode_frame(args)),
        ]

    assert run(compiled) == run(pure("protocol"))


@SETTINGS
@given(request_id=_scalars)
def test_shared_stream_heads_identical(pure: Callable[[str], ModuleType], request_id: Any) -> None:
    from registry.protocol import shared

    assert _outcome(lambda: shared.stream_event_head(request_id)) == _outcome(
        lambda: pure("protocol.shared").stream_event_head(request_id))


# -- the state machine: commands near the schema (right fields, values often wrong) and queries ----

_NAMES = st.sampled_from(["a", "b", "k1", "dir/k", "L1", "-bad", "", "x" * 300])
_INTS = st.one_of(st.sampled_from([0, 1, 2, 3, 1000, 5000, 86_400_000, 2**63, -1]), st.booleans())
_BY_KIND: dict[str, st.SearchStrategy[Any]] = {
    "str": _NAMES,
    "int": _INTS,
    "int?": st.one_of(st.none(), _INTS),
    "map<str,str>": st.dictionaries(st.text(max_size=3), st.one_of(st.text(max_size=3), _scalars), max_size=2),
    "list<str>": st.lists(st.one_of(_NAMES, _scalars), max_size=3),
    "list<int>": st.lists(_INTS, max_size=3),
}


@st.composite
def _command(draw: st.DrawFn) -> Any:
    op = draw(st.sampled_from(sorted(SCHEMAS)))
    schema = SCHEMAS[op]
    cmd: dict[str, Any] = {"op": op}
    for name, spec in schema.items():
        if spec.required or draw(st.booleans()):
            cmd[name] = draw(st.one_of(_BY_KIND[spec.kind], _BY_KIND[spec.kind], _values))
    if draw(st.integers(0, 9)) == 0:
        return draw(st.one_of(_values, st.just({**cmd, "bogus": 1})))
    return cmd


_QUERIES = ("get_service", "get_instance", "services_with_instance", "get_lease", "get_key", "list_keys",
            "get_lock", "list_services", "list_leases")


def _query(state: Any, name: str, args: list[Any]) -> Any:
    n = {"get_instance": 2, "list_services": 0, "list_leases": 0}.get(name, 1)
    return _outcome(lambda: getattr(state, name)(*args[:n]))


_WORLD = [
    {"op": "lease_grant", "ttl_ms": 5000, "now_ms": 0},
    {"op": "register", "service": "a", "id": "b", "address": "h", "port": 1, "lease": 1},
    {"op": "key_put", "key": "k1", "value": "v", "lease": 1},
    {"op": "lock_acquire", "name": "L1", "lease": 1},
]


@SETTINGS
@given(cmds=st.lists(_command(), max_size=25), trusted=st.booleans(),
       queries=st.lists(st.tuples(st.sampled_from(_QUERIES), st.lists(st.one_of(_NAMES, _scalars), min_size=2,
                                                                      max_size=2)), max_size=6))
def test_state_machine_gives_identical_results(pure: Callable[[str], ModuleType], cmds: list[Any], trusted: bool,
                                               queries: list[tuple[str, list[Any]]]) -> None:
    def run(state_module: Any) -> tuple[list[Any], Any]:
        # Fresh copies for each build: apply may keep a command's containers.
        fresh = copy.deepcopy(_WORLD + cmds)
        state = state_module.RegistryState()
        trace = [_outcome(lambda c=cmd: state.apply(c, trusted=trusted)) for cmd in fresh]
        trace += [_query(state, name, args) for name, args in queries]
        snap = state.snapshot()
        trace.append(_outcome(lambda: state_module.RegistryState.restore(snap).snapshot()))
        return trace, snap

    assert run(registry.fsm.state) == run(pure("fsm.state"))


@SETTINGS
@given(data=st.one_of(_values, st.binary(max_size=40)), flips=st.lists(st.integers(0, 10_000), max_size=3))
def test_restore_identical_on_foreign_and_damaged_snapshots(pure: Callable[[str], ModuleType], data: Any,
                                                            flips: list[int]) -> None:
    world = registry.fsm.state.RegistryState()
    for cmd in _WORLD:
        world.apply(dict(cmd))
    damaged = bytearray(world.snapshot())
    for at in flips:
        damaged[at % len(damaged)] ^= 0xFF
    for blob in (data, msgpack.packb(data, use_bin_type=True), bytes(damaged)):
        compiled = _outcome(lambda b=blob: registry.fsm.state.RegistryState.restore(b).snapshot())
        assert compiled == _outcome(lambda b=blob: pure("fsm.state").RegistryState.restore(b).snapshot())
