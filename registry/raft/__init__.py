"""Raft replication: the only package that imports pysyncobj.

Every module here patches or subclasses pysyncobj 0.3.17 internals (its
journal factory, transport, TCP connection and server, and SyncObj's
name-mangled methods), so the package refuses to load on any other version:
a different pysyncobj may rename what the patches replace and silently stop
fsyncing or encrypting.  Code outside the package that needs to say which
pysyncobj it runs on (the benchmarks record it) reads ``PYSYNCOBJ_VERSION``
from here, so the banned-api rule on pysyncobj holds everywhere else.
"""

from pysyncobj.version import VERSION as PYSYNCOBJ_VERSION

__all__ = ["PYSYNCOBJ_VERSION", "PYSYNCOBJ_SUPPORTED"]

#: The one pysyncobj every patch in this package was written and tested against (pinned in pyproject.toml).
PYSYNCOBJ_SUPPORTED = "0.3.17"

if PYSYNCOBJ_VERSION != PYSYNCOBJ_SUPPORTED:
    raise ImportError(f"registry.raft patches pysyncobj {PYSYNCOBJ_SUPPORTED}, but {PYSYNCOBJ_VERSION} is installed: "
                      f"pip install pysyncobj=={PYSYNCOBJ_SUPPORTED}")
