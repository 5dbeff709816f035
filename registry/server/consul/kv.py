"""Consul's KV shapes over our keys.  Pure.

Our values are text (UTF-8, at most ``model.VALUE_BYTES_MAX`` bytes), so a
PUT body must be UTF-8; Consul's are bytes.  ``Flags`` is always 0 and
``LockIndex`` 0 (no sessions); a PUT with non-zero ``?flags`` is refused.
Our keys are printable without whitespace; Consul's slash-separated paths
fit, keys with spaces are refused (INVALID_NAME).
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from typing import Any

from registry.errors import BadRequest
from registry.fsm import model
from registry.fsm.model import Record

__all__ = ["kv_entry", "kv_keys", "kv_value"]


def kv_entry(record: Record) -> dict[str, Any]:
    """One key as Consul's api.KVPair; ``Value`` is base64, as Consul sends it."""
    value: str = record["value"]
    return {
        "LockIndex": 0,
        "Key": record["key"],
        "Flags": 0,
        "Value": base64.b64encode(value.encode("utf-8")).decode("ascii") if value else None,
        "Session": "",
        "CreateIndex": record["create_revision"],
        "ModifyIndex": record["mod_revision"],
    }


def kv_keys(keys: Iterable[str], prefix: str, separator: str | None) -> list[str]:
    """``?keys``: the keys under ``prefix``; with a separator, each run up to it once (Consul's folders)."""
    out: list[str] = []
    seen: set[str] = set()
    for key in keys:
        if not key.startswith(prefix):
            continue
        if separator:
            cut = key.find(separator, len(prefix))
            if cut >= 0:
                key = key[: cut + len(separator)]
        if key not in seen:
            seen.add(key)
            out.append(key)
    return out


def kv_value(body: bytes) -> str:
    """A PUT body as our value: UTF-8 text within the value limit."""
    if len(body) > model.VALUE_BYTES_MAX:
        raise BadRequest(f"value is {len(body)} bytes, at most {model.VALUE_BYTES_MAX}")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("value is not UTF-8 text: this registry stores text values") from None
