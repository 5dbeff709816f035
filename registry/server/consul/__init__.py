"""Consul's HTTP API over the registry: a compatibility front end (see docs/consul.md).

Pure parts: ``params`` (query parameters), ``catalog`` (shapes and instance
selection), ``kv``, ``writes`` (request bodies), ``tracking`` (per-query
indexes).  The aiohttp shell is ``http``.
"""
