"""Any token string hashes: a header's undecodable bytes arrive as surrogates (found by tests/fuzz)."""

from __future__ import annotations

import hashlib

import pytest

from registry.fsm import acl


@pytest.mark.parametrize("secret", ["plain-ascii", "ünïcödé", "\udca1", "a\udcffb", "\ud800"])
def test_hash_secret_takes_any_str(secret: str) -> None:
    digest = acl.hash_secret(secret)
    assert len(digest) == 64 and acl.check_hash("h", digest) == digest


def test_valid_utf8_hashes_as_before() -> None:
    assert acl.hash_secret("ünïcödé") == hashlib.sha256("ünïcödé".encode()).hexdigest()
