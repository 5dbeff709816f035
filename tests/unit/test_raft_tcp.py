"""The Raft port's pure rules (registry/raft/tcp.py): frame lengths by stage, accept errors, limit relations."""

from __future__ import annotations

import errno
import struct
from pathlib import Path

import pytest

from registry.config import NodeConfig
from registry.errors import InvalidArgument
from registry.raft.tcp import (
    ACCEPT_PAUSE,
    ACCEPT_RETRY,
    FrameRefused,
    RaftWireLimits,
    accept_error_action,
    frame_length,
)

LIMITS = RaftWireLimits()


def prefix(length: int) -> bytes:
    return struct.pack("i", length)


@pytest.mark.parametrize(
    ("buffer", "authenticated", "expected"),
    [
        (b"", False, None),
        (prefix(10)[:3], False, None),  # the prefix has not all arrived
        (prefix(0), False, 0),
        (prefix(LIMITS.handshake_message_bytes_max), False, LIMITS.handshake_message_bytes_max),
        (prefix(LIMITS.handshake_message_bytes_max + 1), False, FrameRefused),
        (prefix(LIMITS.handshake_message_bytes_max + 1), True, LIMITS.handshake_message_bytes_max + 1),
        (prefix(LIMITS.message_bytes_max), True, LIMITS.message_bytes_max),
        (prefix(LIMITS.message_bytes_max + 1), True, FrameRefused),
        (prefix((1 << 31) - 1), False, FrameRefused),  # 2 GiB announced by a stranger
        (prefix((1 << 31) - 1), True, FrameRefused),
        (prefix(-1), True, FrameRefused),
        (prefix(-(1 << 31)), False, FrameRefused),
        (prefix(7) + b"more bytes after the prefix", False, 7),
        (bytearray(prefix(7)), True, 7),
    ],
)
def test_frame_length(buffer: bytes, authenticated: bool, expected: int | type[Exception] | None) -> None:
    if isinstance(expected, type):
        with pytest.raises(expected):
            frame_length(buffer, authenticated=authenticated, limits=LIMITS)
    else:
        assert frame_length(buffer, authenticated=authenticated, limits=LIMITS) == expected


@pytest.mark.parametrize(
    ("code", "action"),
    [
        (errno.EMFILE, ACCEPT_PAUSE),
        (errno.ENFILE, ACCEPT_PAUSE),
        (errno.ENOBUFS, ACCEPT_PAUSE),
        (errno.ENOMEM, ACCEPT_PAUSE),
        (errno.ECONNABORTED, ACCEPT_RETRY),
        (errno.EPERM, ACCEPT_RETRY),
        (errno.EINTR, ACCEPT_RETRY),
        (None, ACCEPT_RETRY),
    ],
)
def test_accept_error_action_never_closes_the_listener(code: int | None, action: str) -> None:
    assert accept_error_action(code) == action


@pytest.mark.parametrize(
    ("changes", "ok"),
    [
        ({}, True),
        ({"handshake_message_bytes_max": 511}, False),
        ({"handshake_message_bytes_max": (1 << 20) + 1}, False),
        ({"message_bytes_max": 1024}, False),  # below the handshake limit
        ({"message_bytes_max": 1 << 31}, False),  # a signed 32-bit prefix cannot say it
        ({"message_bytes_max": (1 << 31) - 1}, True),
        ({"handshake_deadline_s": 0.0}, False),
        ({"handshake_deadline_s": 61.0}, False),
        ({"unauthenticated_connections_max": 0}, False),
        ({"unauthenticated_connections_max": 10_001}, False),
        ({"read_bytes_per_event_max": (64 << 10) - 1}, False),
        ({"read_bytes_per_event_max": (256 << 20) + 1}, False),
        ({"accept_pause_s": 0.0}, False),
        ({"accept_pause_s": 10.5}, False),
    ],
)
def test_limits_validate(changes: dict[str, float], ok: bool) -> None:
    limits = RaftWireLimits(**changes)  # type: ignore[arg-type]
    if ok:
        limits.validate()
    else:
        with pytest.raises(InvalidArgument):
            limits.validate()


@pytest.mark.parametrize(
    ("batch_bytes_max", "message_bytes_max", "ok"),
    [
        (16 << 20, 256 << 20, True),
        (16 << 20, 17 << 20, True),
        (16 << 20, (17 << 20) - 1, False),  # an entry plus its framing must fit one message
        (128 << 20, 128 << 20, False),
    ],
)
def test_node_config_keeps_an_entry_inside_one_raft_message(batch_bytes_max: int, message_bytes_max: int,
                                                            ok: bool) -> None:
    config = NodeConfig(node_id="n1", data_dir=Path("/nonexistent"), raft_addr="127.0.0.1:7101", peers=(),
                        dev=True, batch_bytes_max=batch_bytes_max,
                        raft_wire=RaftWireLimits(message_bytes_max=message_bytes_max))
    if ok:
        config.validate()
    else:
        with pytest.raises(InvalidArgument, match="message_bytes_max"):
            config.validate()
