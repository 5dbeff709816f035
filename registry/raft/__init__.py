"""Raft replication: the only package that imports pysyncobj.

Code outside it that needs to say which pysyncobj it runs on (the benchmarks
record it beside their numbers) reads ``PYSYNCOBJ_VERSION`` from here, so the
banned-api rule on pysyncobj holds everywhere else.
"""

from pysyncobj.version import VERSION as PYSYNCOBJ_VERSION

__all__ = ["PYSYNCOBJ_VERSION"]
