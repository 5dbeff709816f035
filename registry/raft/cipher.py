"""Authenticated encryption of Raft messages: our AES-256-GCM in place of pysyncobj's Fernet."""

from __future__ import annotations

import hashlib
import itertools
import os
import struct
from collections.abc import Callable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from registry.config import RAFT_ADDRESS_BYTES_MAX

__all__ = ["DEV_MODE_KEY", "RaftCipher"]

#: The "cluster key" of ``--dev`` nodes: public, so it keeps no one out; it
#: only lets dev nodes use the same message framing (sender identity) as real ones.
DEV_MODE_KEY = "raft-registry dev mode: no secret"


class RaftCipher:
    """Authenticated encryption of pysyncobj messages (its ``encryptor`` interface), AES-256-GCM.

    pysyncobj calls ``encrypt_at_time(data, ts)`` per message sent, and per
    message received ``extract_timestamp(token)`` (it refuses a timestamp
    below the connection's last one) then ``decrypt(token)``; any exception
    drops the connection.

    Keys.  The cluster key is stretched once (PBKDF2-SHA256, 100k rounds, as
    pysyncobj does for Fernet) into a master key.  Each process draws a random
    16-byte salt at start and encrypts with HKDF(master, salt); nonces are a
    per-process counter, so a (key, nonce) pair never repeats: no birthday
    bound on random nonces.  Receivers derive the sender's key from the salt
    in the header (a few cached: one per peer process lifetime).

    Identity.  The header also names the sender: its Raft address and its
    data directory's incarnation (``incarnation.py``).  After a message
    authenticates, ``check(address, incarnation)`` may refuse it by raising,
    which makes pysyncobj drop the connection: that is how a wiped node
    speaking under a member's address is kept out of elections.

    Token: version (1) | salt (16) | counter (8) | timestamp (8) |
    incarnation (16) | address length (1) | address | ciphertext and 16-byte
    tag.  The whole header is authenticated (associated data), and
    ``extract_timestamp`` authenticates before it answers.
    """

    VERSION = 2
    _HEADER = struct.Struct(">B16sQQ16sB")
    _KDF_SALT = b"raft-registry/raft-aead/v1"
    _KEY_INFO = b"raft-registry raft message key v1"
    _CACHED_KEYS_MAX = 64
    #: Longest Raft address a header can carry (bytes of UTF-8); NodeConfig.validate refuses longer.
    ADDRESS_BYTES_MAX = RAFT_ADDRESS_BYTES_MAX

    def __init__(self, cluster_key: str, sender: str, incarnation: str,
                 check: Callable[[str, str], None] | None = None) -> None:
        address = sender.encode()
        if len(address) > self.ADDRESS_BYTES_MAX:
            raise ValueError(f"raft address longer than {self.ADDRESS_BYTES_MAX} bytes")
        self._master = hashlib.pbkdf2_hmac("sha256", cluster_key.encode(), self._KDF_SALT, 100_000)
        self._salt = os.urandom(16)
        self._aead = AESGCM(self._derive(self._salt))
        self._counter = itertools.count(1)
        #: Messages encrypted so far (every Raft message this process sent).
        self.messages_sent = 0
        self._identity = bytes.fromhex(incarnation)
        self._address = address
        self._check = check
        self._peers: dict[bytes, AESGCM] = {}
        #: The last token opened and its (timestamp, plaintext): decrypt() follows extract_timestamp().
        self._last: tuple[bytes | None, tuple[int, bytes]] = (None, (0, b""))

    def _derive(self, salt: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=self._KEY_INFO).derive(self._master)

    @staticmethod
    def _nonce(counter: int) -> bytes:
        return b"\0\0\0\0" + counter.to_bytes(8, "big")

    def encrypt_at_time(self, data: bytes, timestamp: int) -> bytes:
        counter = next(self._counter)
        self.messages_sent = counter
        header = self._HEADER.pack(self.VERSION, self._salt, counter, timestamp, self._identity,
                                   len(self._address)) + self._address
        return header + self._aead.encrypt(self._nonce(counter), data, header)

    def _open(self, token: bytes) -> tuple[int, bytes]:
        last_token, opened = self._last
        if last_token is token:
            return opened
        if len(token) < self._HEADER.size or token[0] != self.VERSION:
            raise ValueError(f"raft message format {token[:1].hex() or 'empty'}, expected {self.VERSION} "
                             "(every node must run the same raft-registry version)")
        _, salt, counter, timestamp, identity, address_len = self._HEADER.unpack_from(token)
        size = self._HEADER.size + address_len
        aead = self._peers.get(salt)
        if aead is None:
            if len(self._peers) >= self._CACHED_KEYS_MAX:
                self._peers.clear()
            aead = AESGCM(self._derive(salt))
        plain = aead.decrypt(self._nonce(counter), token[size:], token[:size])  # raises InvalidTag
        self._peers[salt] = aead  # cached only once a message under it authenticated
        if self._check is not None:
            self._check(token[self._HEADER.size : size].decode(), identity.hex())
        self._last = (token, (timestamp, plain))
        return timestamp, plain

    def extract_timestamp(self, token: bytes) -> int:
        return self._open(token)[0]

    def sequence(self, token: bytes) -> tuple[bytes, int]:
        """(sender process salt, message counter) from the header of a token already opened.

        Counters count up per sending process and each connection carries one
        process's messages in order, so a receiver refuses a counter that does
        not grow on its connection: a replayed or reordered message.
        """
        _, salt, counter, *_ = self._HEADER.unpack_from(token)
        return bytes(salt), int(counter)

    def decrypt(self, token: bytes) -> bytes:
        return self._open(token)[1]
