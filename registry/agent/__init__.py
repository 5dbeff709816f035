"""The thin agent: registration, health checks, and client-side load balancing.

Pure parts (no I/O, table-tested): ``policies``, ``outlier``, ``health``,
``table``, ``balancer``, ``config``.  I/O shells: ``checks``, ``proxy``,
``runner`` (the ``regctl agent`` process) and ``resolver`` (the same
routing in-process, for Python applications).  ``echo`` is a tiny service
for the demo, the tests and the benchmark.

Import from the modules (``from registry.agent.resolver import Resolver``):
this package imports nothing itself, so ``regctl`` starts fast.
"""
