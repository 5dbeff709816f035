"""`pytest tests/compose` runs the compose suite although pyproject's addopts deselect `slow`.

The default run (`python -m pytest`, all of tests/) keeps skipping it; asking
for this directory (or a file in it) explicitly is asking for exactly this
slow suite, so the `-m "not slow"` that addopts adds is dropped then. An
explicit `-m` on the command line is left alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
DEFAULT_MARKEXPR = "not slow"


def _inside_here(arg: str) -> bool:
    path = Path(arg.split("::", 1)[0])
    if not path.is_absolute():
        path = Path.cwd() / path
    try:
        path.resolve().relative_to(HERE)
    except ValueError:
        return False
    return True


def pytest_configure(config: pytest.Config) -> None:
    given = [str(a) for a in config.invocation_params.args]
    explicit_m = any(a == "-m" or (a.startswith("-m") and not a.startswith("--")) for a in given)
    args = list(config.args)
    if (not explicit_m and config.option.markexpr == DEFAULT_MARKEXPR and args
            and all(_inside_here(a) for a in args)):
        config.option.markexpr = ""
