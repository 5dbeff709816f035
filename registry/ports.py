"""Checking that local ports are free before starting nodes on them."""

from __future__ import annotations

import socket
from collections.abc import Iterable

__all__ = ["ports_free"]


def ports_free(ports: Iterable[int], host: str = "127.0.0.1") -> bool:
    """True if every port can be bound on ``host`` right now (a hint: another process may take it later)."""
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                return False
    return True
