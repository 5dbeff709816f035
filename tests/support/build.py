"""Which build (mypyc or pure, registry/build.py) the installed package is: what node processes run.

A test run from the checkout imports ``registry`` from the source tree (the
current directory comes first on ``sys.path``), while the nodes it starts
run the installed ``regctl``; after ``pip install .`` with a C compiler the
two differ, so integration tests ask the install, from a neutral directory.
"""

from __future__ import annotations

import os
import subprocess
import sys

_ASK = "from registry.build import build_kind; print(build_kind())"


def installed_build() -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", _ASK], cwd="/", env=env, capture_output=True, text=True,
                         timeout=60, check=True)
    return out.stdout.strip()
