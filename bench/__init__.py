"""Benchmarks of a local raft-registry cluster, and of etcd beside it.

Run them from the repository root as modules (``python -m bench.run``,
``python -m bench.compare``, ...); bench/README.md says what each measures.
"""
