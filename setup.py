"""Build the pure hot modules with mypyc where a C compiler is present (issue #24).

Everything else about the package is in pyproject.toml; this file only adds
the extension modules.  The compiled build and the pure one behave the same
(tests/unit/test_compiled_equivalence.py compares them); compiling takes the
interpreter out of a write's ~20 small costs at once.

* ``REGISTRY_NO_MYPYC=1`` builds the pure-Python package.
* No C compiler, no Python headers or no mypyc: the pure-Python package, with a note on stderr.
* ``pip install -e`` (editable): pure Python too, so edits take effect.
* The ``.py`` sources ship beside the extensions either way.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import sysconfig
from typing import Any

from setuptools import setup

#: The modules compiled, all pure (no I/O, no threads).  Left out, and why:
#: registry/protocol/messages.py -- its dataclasses are the messages' public
#: constructors; compiled, their typed fields would take ``True`` as 1 (and
#: raise TypeError for a str id) before ``__post_init__`` could refuse it.
#: registry/fsm/limits.py -- the same for ``StateLimits``, and it is not hot.
HOT_MODULES = [
    "registry/fsm/acl.py",
    "registry/fsm/commands.py",
    "registry/fsm/leases.py",
    "registry/fsm/model.py",
    "registry/fsm/ops.py",
    "registry/fsm/state.py",
    "registry/fsm/watch.py",
    "registry/protocol/__init__.py",
    "registry/protocol/connection.py",
    "registry/protocol/frames.py",
    "registry/protocol/shared.py",
]


def _compiler_present() -> bool:
    """A C compiler and Python's headers (Debian ships them apart, in python3-dev)."""
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    headers = os.path.join(sysconfig.get_paths()["include"], "Python.h")
    return shutil.which(shlex.split(cc)[0]) is not None and os.path.exists(headers)


def _editable() -> bool:
    # pip install -e runs the editable_wheel (or, legacy, develop) command.
    return any(arg in ("editable_wheel", "develop") for arg in sys.argv[1:])


def _ext_modules() -> list[Any]:
    if os.environ.get("REGISTRY_NO_MYPYC", "") not in ("", "0"):
        return []
    if _editable():
        # Extensions built into the source tree would shadow every later edit of the .py files.
        print("raft-registry: editable install, building the pure-Python package", file=sys.stderr)
        return []
    if not _compiler_present():
        print("raft-registry: no C compiler or no Python.h, building the pure-Python package", file=sys.stderr)
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:  # an install without build isolation and without mypy
        print("raft-registry: mypyc not installed, building the pure-Python package", file=sys.stderr)
        return []
    # group_name: one shared library named for the project instead of a hash.
    return list(mypycify(HOT_MODULES, opt_level="3", group_name="registry_hot"))


_EXTENSIONS = _ext_modules()
# One build directory per kind: setuptools packs everything under build/lib into the wheel, so a pure
# build in the directory of an earlier compiled one would ship its stale extensions.
setup(ext_modules=_EXTENSIONS, options={"build": {"build_base": "build/mypyc" if _EXTENSIONS else "build/pure"}})
