"""The benchmark's etcd gateway helpers (bench/etcdload.py) that need no server: key ranges, reply checks."""

from __future__ import annotations

import pytest

from bench.etcdload import EtcdError, check_reply, prefix_end


@pytest.mark.parametrize(("prefix", "end"), [(b"/bench/", b"/bench0"), (b"a", b"b"), (b"/x/y-", b"/x/y.")])
def test_prefix_end(prefix: bytes, end: bytes) -> None:
    assert prefix_end(prefix) == end


# (name, HTTP status, body, the result or the error code)
CHECKS: list[tuple[str, int, bytes, dict[str, object] | str]] = [
    ("unary ok", 200, b'{"header": {"revision": "2"}}', {"header": {"revision": "2"}}),
    ("stream result unwrapped", 200, b'{"result": {"ID": "7", "TTL": "600"}}', {"ID": "7", "TTL": "600"}),
    ("stream error", 200, b'{"error": {"grpc_code": 5, "http_code": 404, "message": "lease not found"}}', "http_404"),
    ("unary error status", 400, b'{"error": "etcdserver: bad", "code": 3}', "http_400"),
    ("not json", 502, b"<html>bad gateway</html>", "http_502"),
]


@pytest.mark.parametrize(("status", "body", "expected"), [c[1:] for c in CHECKS], ids=[c[0] for c in CHECKS])
def test_check(status: int, body: bytes, expected: dict[str, object] | str) -> None:
    if isinstance(expected, str):
        with pytest.raises(EtcdError) as err:
            check_reply(status, body)
        assert err.value.code == expected
    else:
        assert check_reply(status, body) == expected
