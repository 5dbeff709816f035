"""Structured logs: one line an event, each with the node id and revision."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable

__all__ = ["configure_logging"]


class _Context(logging.Filter):
    def __init__(self, node_id: str, revision: Callable[[], int], term: Callable[[], int]) -> None:
        super().__init__()
        self._node_id = node_id
        self._revision = revision
        self._term = term

    def filter(self, record: logging.LogRecord) -> bool:
        record.node = self._node_id
        try:
            record.revision = self._revision()
            record.term = self._term()
        except Exception:
            record.revision = -1
            record.term = -1
        return True


class _JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "node": getattr(record, "node", ""),
            "term": getattr(record, "term", -1),
            "revision": getattr(record, "revision", -1),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"))


def configure_logging(
    node_id: str, fmt: str, level: str, revision: Callable[[], int], term: Callable[[], int]
) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Context(node_id, revision, term))
    if fmt == "json":
        handler.setFormatter(_JSONFormatter())
    else:
        handler.setFormatter(
            logging.Formatter(
                "%(asctime)s %(levelname)s node=%(node)s term=%(term)s rev=%(revision)s %(name)s: %(message)s"
            )
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pysyncobj logs every reconnect attempt at warning level; keep its errors.
    logging.getLogger("pysyncobj").setLevel(logging.ERROR)
