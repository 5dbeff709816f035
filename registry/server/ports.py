"""Checking that local ports are free before starting nodes on them."""

from __future__ import annotations

import socket
from collections.abc import Iterable

__all__ = ["free_ports", "ports_free"]


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


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports free on ``host`` right now (bound to port 0 together, then released)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            sock = socket.socket()
            sock.bind((host, 0))
            socks.append(sock)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for sock in socks:
            sock.close()
