"""registry.build: which build a process runs, as regctl status and regctl_build_info report it (#24)."""

from __future__ import annotations

import importlib
import os

import pytest

import registry.build
import registry.fsm.state
from registry.build import build_kind


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        ("registry.build", "pure"),  # never compiled: not in setup.py's list
        ("msgpack._cmsgpack", "mypyc"),  # an extension module: what a compiled module is loaded from
    ],
)
def test_build_kind_tells_extensions_from_sources(module: str, expected: str) -> None:
    assert build_kind(importlib.import_module(module)) == expected


def test_the_state_machine_decides() -> None:
    compiled = os.path.splitext(str(registry.fsm.state.__file__))[1] == ".so"
    assert build_kind() == ("mypyc" if compiled else "pure")
    assert build_kind(registry.build) == "pure"
