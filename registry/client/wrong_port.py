"""Telling a registry API port from the other ports a user may point the client at (pure).

A node answers a client's hello with a frame: a 4-byte length, then msgpack.
Pointed elsewhere, the client used to read the other protocol's first bytes
as that length ("HTTP" is 1213486160) and report a frame too large.  The
first bytes are recognised instead, and the error says what answered:

- ``HTTP/``: an HTTP server, such as a node's ``--http`` port
  (``/metrics``, ``/healthz``), which answers our hello with a 400.
- a TLS record (content type 21 or 22, version 3.x): a TLS server, such as
  a node started with ``--tls-cert``, reached without ``--tls-ca``.
- ``SSH-``: an SSH server.
- nothing at all, the connection closed: a node's Raft port closes a
  connection whose first message does not authenticate, without a byte.
"""

from __future__ import annotations

__all__ = ["SILENT", "what_answered", "wrong_port_message"]

#: ``what_answered`` for a peer that closed the connection without sending a byte.
SILENT = "nothing"

#: The protocols recognised from a peer's first bytes, longest prefix first.
_PREFIXES = ((b"HTTP/", "HTTP"), (b"SSH-", "SSH"))


def what_answered(first_bytes: bytes) -> str | None:
    """The foreign protocol ``first_bytes`` (what a peer sent before anything else) belong to, else None.

    None means the bytes may be ours (or are too few to tell: the frame
    decoder then judges them, and the caller reports what it refuses during
    the hello as a wrong port too).  An empty ``first_bytes`` means the peer
    closed without a byte: ``SILENT``.
    """
    if not first_bytes:
        return SILENT
    for prefix, name in _PREFIXES:
        if first_bytes.startswith(prefix):
            return name
    # A TLS record header: content type alert (21) or handshake (22), then major version 3.
    if len(first_bytes) >= 2 and first_bytes[0] in (21, 22) and first_bytes[1] == 3:
        return "TLS"
    return None


def wrong_port_message(endpoint: str, answered: str) -> str:
    """One line for the user: what answered at ``endpoint`` and where the API ports are."""
    api_ports = ("a node's client API is its --api address (regctl up: API base+1..N, 7001-7003 by default; "
                 "Raft base+101.., HTTP base+201..)")
    if answered == "HTTP":
        return f"{endpoint} answered HTTP: that is a node's HTTP port (/metrics, /healthz), not its API; {api_ports}"
    if answered == "TLS":
        return f"{endpoint} answered TLS: that node serves its API over TLS; pass --tls-ca (and --tls-cert/--tls-key)"
    if answered == SILENT:
        return (f"{endpoint} closed the connection without answering the hello: not a registry API port "
                f"(a node's Raft port does that; so does a node at its connection limit); {api_ports}")
    return f"{endpoint} answered {answered}: not a registry API port; {api_ports}"
