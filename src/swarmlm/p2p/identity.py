"""A peer's identity: one Ed25519 key, kept in `<data_dir>/identity.key`.

The same key file is handed to the libp2p daemon, so the peer ID that libp2p announces is
derived from it, and the same key signs the DHT records this peer publishes. An Ed25519 peer
ID embeds its public key (libp2p's "identity" multihash), so anyone can check a signature
against a peer ID alone, with no key exchange. Knows nothing of hivemind, the DHT or the store.

File format: libp2p's protobuf `PrivateKey{Type=Ed25519, Data=seed||public}`, the format the
daemon reads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from swarmlm import base58
from swarmlm.errors import IntegrityError, UserError

IDENTITY_FILE = "identity.key"
_ED25519 = 1                   # libp2p crypto.pb KeyType.Ed25519
_IDENTITY_MULTIHASH = 0x00     # peer IDs of keys up to 42 bytes inline the key itself
_PUBLIC_PB_LEN = 36            # protobuf PublicKey{Type, Data(32)}
_PUBLIC_PB_PREFIX = bytes([0x08, _ED25519, 0x12, 32])


def _key_protobuf(data: bytes) -> bytes:
    """libp2p crypto.pb `{Type: Ed25519, Data: data}` (fields 1 and 2; data is under 128 bytes)."""
    return bytes([0x08, _ED25519, 0x12, len(data)]) + data


def peer_id_of(public_key: bytes) -> str:
    """The base58 libp2p peer ID of a raw 32-byte Ed25519 public key ("12D3KooW...")."""
    encoded = _key_protobuf(public_key)
    return base58.encode(bytes([_IDENTITY_MULTIHASH, len(encoded)]) + encoded)


def public_key_of(peer_id: str) -> bytes:
    """The raw Ed25519 public key inside a peer ID; `IntegrityError` for any other kind of ID."""
    try:
        raw = base58.decode(peer_id)
    except (ValueError, TypeError):
        raise IntegrityError(f"peer ID {peer_id!r} is not base58") from None
    if (len(raw) != 2 + _PUBLIC_PB_LEN or raw[0] != _IDENTITY_MULTIHASH or raw[1] != _PUBLIC_PB_LEN
            or raw[2:6] != _PUBLIC_PB_PREFIX):
        raise IntegrityError(f"peer ID {peer_id!r} does not carry an Ed25519 key")
    return raw[6:]


def verify(peer_id: str, data: bytes, signature: bytes) -> bool:
    """True if `signature` over `data` was made by the key behind `peer_id`."""
    try:
        key = Ed25519PublicKey.from_public_bytes(public_key_of(peer_id))
        key.verify(signature, data)
        return True
    except (IntegrityError, InvalidSignature, ValueError, TypeError):
        return False


@dataclass(frozen=True)
class Identity:
    """One peer's signing key and the peer ID derived from it."""

    private_key: Ed25519PrivateKey
    peer_id: str                  # base58, "12D3KooW..."

    @classmethod
    def generate(cls) -> Identity:
        key = Ed25519PrivateKey.generate()
        return cls(key, peer_id_of(_raw_public(key)))

    @classmethod
    def load_or_create(cls, path: str | os.PathLike) -> Identity:
        """Read the key at `path`, or write a new one there (mode 0600) if there is none."""
        path = Path(path)
        if path.exists():
            return cls.load(path)
        identity = cls.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(identity.to_bytes())
        os.replace(tmp, path)
        return identity

    @classmethod
    def load(cls, path: str | os.PathLike) -> Identity:
        data = Path(path).read_bytes()
        if len(data) != 4 + 64 or data[:4] != _key_protobuf(b"\0" * 64)[:4]:
            raise UserError(f"{path} is not an Ed25519 libp2p identity key")
        key = Ed25519PrivateKey.from_private_bytes(data[4:36])
        if _raw_public(key) != data[36:]:
            raise UserError(f"{path}: the public half does not match the private key")
        return cls(key, peer_id_of(_raw_public(key)))

    def to_bytes(self) -> bytes:
        """The key file's contents (libp2p protobuf; seed and public key, 64 bytes of data)."""
        seed = self.private_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                              serialization.NoEncryption())
        return _key_protobuf(seed + _raw_public(self.private_key))

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)   # 64 bytes


def _raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
