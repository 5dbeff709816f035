"""apply_entry: refused commands are outcomes every replica reaches; anything else stops the node."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from registry.fsm.state import Applied, RegistryState
from registry.raft.node import StateHolder, apply_entry


class _BuggyState:
    """A state machine with a bug in one op (what a half-deployed upgrade could bring).

    It wraps a real state rather than subclassing it: the compiled build's classes cannot be
    subclassed by interpreted ones.
    """

    def __init__(self) -> None:
        self._real = RegistryState()

    @property
    def revision(self) -> int:
        return self._real.revision

    def apply(self, command: object, *, trusted: bool = False, entry_term: int | None = None) -> Applied:
        if isinstance(command, dict) and command.get("op") == "key_delete":
            raise ZeroDivisionError("division by zero")
        return self._real.apply(command, trusted=trusted, entry_term=entry_term)


def _entry(*commands: dict[str, Any]) -> bytes:
    return msgpack.packb(list(commands), use_bin_type=True)


PUT = {"op": "key_put", "key": "k", "value": "v"}


@pytest.mark.parametrize(
    ("commands", "outcome_ok", "bugs"),
    [
        ([PUT], [True], 0),
        ([{"op": "key_get", "key": "k"}], [False], 0),  # not a command: refused, the same on every replica
        ([PUT, {"op": "key_put", "key": "", "value": "v"}], [True, False], 0),  # bad name: BAD_REQUEST
        ([PUT, {"op": "key_delete", "key": "k"}], [True, False], 1),  # a bug: on_bug is told
    ],
    ids=["applied", "unknown-op", "refused", "bug"],
)
def test_outcomes_and_bugs(commands: list[dict[str, Any]], outcome_ok: list[bool], bugs: int) -> None:
    holder = StateHolder(_BuggyState())  # type: ignore[arg-type]
    seen: list[tuple[Any, BaseException]] = []
    told: list[int] = []
    outcomes = apply_entry(holder, _entry(*commands), lambda: 1, [lambda rev, events, size: told.append(rev)],
                           on_bug=lambda command, exc: seen.append((command, exc)))
    assert [o[0] for o in outcomes] == outcome_ok
    assert len(seen) == bugs
    if bugs:
        assert seen[0][0]["op"] == "key_delete" and isinstance(seen[0][1], ZeroDivisionError)
    assert told == [holder.state.revision]


def test_an_undecodable_entry_is_skipped_the_same_way_everywhere() -> None:
    holder = StateHolder()
    assert apply_entry(holder, b"\xc1", lambda: 1, [], on_bug=lambda c, e: pytest.fail("not a bug")) == []
    assert apply_entry(holder, msgpack.packb({"op": "x"}), lambda: 1, []) == []
    assert holder.state.revision == 0
