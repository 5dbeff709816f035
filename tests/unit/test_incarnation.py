"""Data-directory identity: the guard's decisions, the identity file, and the framing that carries it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag

from registry.errors import InvalidArgument, RegistryError
from registry.fsm.state import RegistryState
from registry.raft.cipher import RaftCipher
from registry.raft.incarnation import INCARNATION_FILE, IncarnationGuard, PeerRefused, check_incarnation, load_or_create
from registry.server.backup import encode_backup, load_seed, seed_data_dir

A = "a" * 32
B = "b" * 32
KEY = "test-cluster-key-0123456789"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("recorded", "sender", "admitted", "seen"),
    [
        (None, A, True, {"10.0.0.1:7101": A}),  # unrecorded: admitted, remembered for the leader to record
        (A, A, True, {}),  # the recorded directory
        (A, B, False, {}),  # another directory under a recorded address: refused
    ],
)
def test_guard_decisions(recorded: str | None, sender: str, admitted: bool, seen: dict[str, str]) -> None:
    refused: list[str] = []
    guard = IncarnationGuard(lambda addr: recorded, on_refused=refused.append)
    if admitted:
        guard.check("10.0.0.1:7101", sender)
    else:
        with pytest.raises(PeerRefused, match=r"10\.0\.0\.1:7101"):
            guard.check("10.0.0.1:7101", sender)
    assert guard.seen == seen
    assert guard.refused == (0 if admitted else 1)
    assert refused == ([] if admitted else ["10.0.0.1:7101"])


def test_guard_logs_a_refused_peer_once_per_period(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    guard = IncarnationGuard(lambda addr: A, clock=clock)
    with caplog.at_level(logging.ERROR, logger="registry.raft.incarnation"):
        for _ in range(50):  # a refused peer reconnects over and over
            with pytest.raises(PeerRefused):
                guard.check("10.0.0.1:7101", B)
        clock.now += 10.0
        with pytest.raises(PeerRefused):
            guard.check("10.0.0.1:7101", B)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and guard.refused == 51
    assert "regctl member remove 10.0.0.1:7101" in messages[0]


@pytest.mark.parametrize("value", ["", "A" * 32, "a" * 31, "a" * 33, "g" * 32, 7, None])
def test_check_incarnation_refuses_what_is_not_32_lowercase_hex(value: object) -> None:
    with pytest.raises(InvalidArgument, match="32 lowercase hex"):
        check_incarnation(value)


def test_identity_file_is_made_once_and_kept(tmp_path: Path) -> None:
    first, created = load_or_create(tmp_path / "node")
    assert created and check_incarnation(first) == first
    again, created_again = load_or_create(tmp_path / "node")
    assert (again, created_again) == (first, False)
    assert (tmp_path / "node" / INCARNATION_FILE).read_text().strip() == first
    other, _ = load_or_create(tmp_path / "other")
    assert other != first


def test_corrupt_identity_file_is_refused_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / INCARNATION_FILE
    path.write_text("not an incarnation\n")
    with pytest.raises(InvalidArgument, match="corrupt incarnation file"):
        load_or_create(tmp_path)
    assert path.read_text() == "not an incarnation\n"


def test_cipher_carries_the_sender_identity_to_the_check() -> None:
    checked: list[tuple[str, str]] = []
    sender = RaftCipher(KEY, "10.0.0.1:7101", A)
    receiver = RaftCipher(KEY, "10.0.0.2:7102", B, lambda addr, inc: checked.append((addr, inc)))
    token = sender.encrypt_at_time(b"append_entries", 42)
    assert receiver.extract_timestamp(token) == 42
    assert receiver.decrypt(token) == b"append_entries"
    assert checked == [("10.0.0.1:7101", A)]  # checked once per message, not per call


def test_cipher_refusal_propagates_so_pysyncobj_drops_the_connection() -> None:
    guard = IncarnationGuard(lambda addr: B)
    receiver = RaftCipher(KEY, "10.0.0.2:7102", B, guard.check)
    token = RaftCipher(KEY, "10.0.0.1:7101", A).encrypt_at_time(b"request_vote", 1)
    with pytest.raises(PeerRefused):
        receiver.extract_timestamp(token)


@pytest.mark.parametrize("offset", [1, 17, 33, 40, 57, 60])  # salt, counter, timestamp, identity, address
def test_cipher_header_is_authenticated(offset: int) -> None:
    receiver = RaftCipher(KEY, "10.0.0.2:7102", B, lambda addr, inc: None)
    token = bytearray(RaftCipher(KEY, "10.0.0.1:7101", A).encrypt_at_time(b"x", 1))
    token[offset] ^= 0x01
    with pytest.raises((InvalidTag, UnicodeDecodeError, ValueError)):
        receiver.decrypt(bytes(token))


def test_cipher_refuses_another_key_and_another_format() -> None:
    receiver = RaftCipher(KEY, "10.0.0.2:7102", B)
    with pytest.raises(InvalidTag):
        receiver.decrypt(RaftCipher("another-cluster-key-0123", "10.0.0.1:7101", A).encrypt_at_time(b"x", 1))
    token = RaftCipher(KEY, "10.0.0.1:7101", A).encrypt_at_time(b"x", 1)
    with pytest.raises(ValueError, match="expected 2"):
        receiver.decrypt(b"\x01" + token[1:])


@pytest.mark.parametrize(
    ("recorded", "command", "outcome", "after"),
    [
        (None, {"op": "identity_put", "raft": "h:1", "incarnation": A, "mode": "create"}, "ok", {"h:1": A}),
        ({"h:1": A}, {"op": "identity_put", "raft": "h:1", "incarnation": A, "mode": "create"}, "ok", {"h:1": A}),
        ({"h:1": A}, {"op": "identity_put", "raft": "h:1", "incarnation": B, "mode": "create"}, "CONFLICT",
         {"h:1": A}),
        ({"h:1": A}, {"op": "identity_put", "raft": "h:1", "incarnation": B, "mode": "replace"}, "ok", {"h:1": B}),
        ({"h:1": A}, {"op": "identity_delete", "raft": "h:1"}, "ok", {}),
        (None, {"op": "identity_delete", "raft": "h:1"}, "ok", {}),
        (None, {"op": "identity_put", "raft": "h:1", "incarnation": "A" * 32, "mode": "create"}, "INVALID_ARGUMENT",
         {}),
        (None, {"op": "identity_put", "raft": "h:1", "incarnation": A, "mode": "upsert"}, "INVALID_ARGUMENT", {}),
        (None, {"op": "identity_put", "raft": "h 1", "incarnation": A, "mode": "create"}, "INVALID_NAME", {}),
    ],
)
def test_identity_ops(recorded: dict[str, str] | None, command: dict[str, str], outcome: str,
                      after: dict[str, str]) -> None:
    """Member identities are cluster metadata: they never move the revision or make events."""
    state = RegistryState()
    state.apply({"op": "key_put", "key": "app/config", "value": "v"})
    for raft, inc in (recorded or {}).items():
        state.apply({"op": "identity_put", "raft": raft, "incarnation": inc, "mode": "create"})
    revision, snapshot = state.revision, state.snapshot()
    if outcome == "ok":
        applied = state.apply(command)
        assert applied.events == [] and applied.result["revision"] == revision
    else:
        with pytest.raises(RegistryError) as caught:
            state.apply(command)
        assert caught.value.code == outcome
        assert state.snapshot() == snapshot
    assert state.identities() == after and state.revision == revision
    assert RegistryState.restore(state.snapshot()).identities() == after


def test_identities_survive_snapshots_and_a_seed_forgets_them() -> None:
    state = RegistryState()
    assert b"identities" not in state.snapshot()  # no record, same bytes as before identities existed
    state.apply({"op": "identity_put", "raft": "10.0.0.1:7101", "incarnation": A, "mode": "create"})
    restored = RegistryState.restore(state.snapshot())
    assert restored.identity("10.0.0.1:7101") == A and restored.identity("10.0.0.2:7102") is None
    assert restored.forget_identities() == 1 and restored.identities() == {}


def test_a_restored_seed_starts_without_the_old_clusters_identities(tmp_path: Path) -> None:
    """A new cluster restored from a backup has new data directories, often at the old addresses."""
    state = RegistryState()
    state.apply({"op": "identity_put", "raft": "10.0.0.1:7101", "incarnation": A, "mode": "create"})
    state.apply({"op": "key_put", "key": "app/config", "value": "v"})
    seed_data_dir(encode_backup(state.snapshot(), state.revision, 0), tmp_path / "n1")
    seeded = load_seed(tmp_path / "n1")
    assert seeded is not None
    assert seeded.identities() == {} and seeded.revision == state.revision
    assert seeded.get_key("app/config")["value"] == "v"
