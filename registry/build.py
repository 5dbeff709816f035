"""Which build of the package this process runs (issue #24).

``pip install .`` compiles the pure hot modules with mypyc where a C compiler
is present (setup.py); ``REGISTRY_NO_MYPYC=1`` or an editable install gives
pure Python.  ``regctl status`` and ``regctl_build_info`` report which one a
node runs, since the two differ in speed (bench/NOTES.md), never in behaviour.
"""

from __future__ import annotations

from importlib.machinery import EXTENSION_SUFFIXES
from types import ModuleType
from typing import Literal

import registry.fsm.state

__all__ = ["build_kind"]

Build = Literal["mypyc", "pure"]


def build_kind(module: ModuleType = registry.fsm.state) -> Build:
    """``"mypyc"`` if ``module`` (by default the state machine) was loaded from an extension, else ``"pure"``."""
    return "mypyc" if str(module.__file__).endswith(tuple(EXTENSION_SUFFIXES)) else "pure"
