"""The per-round key material of one client, and the secrets derived between two clients.

Each round a client makes two fresh X25519 key pairs (one to encrypt the shares it sends,
one to agree pairwise mask seeds) and a fresh self-mask seed; nothing is reused across
rounds, so a key revealed to unmask a dropped client in one round protects nothing later.
Knows nothing of stages or messages.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from swarmlm.errors import IntegrityError
from swarmlm.privacy.secagg.masking import derive

_RAW = serialization.Encoding.Raw


@dataclass(frozen=True)
class RoundKeys:
    enc: X25519PrivateKey
    mask: X25519PrivateKey
    self_seed: bytes                 # 32 bytes: the self-mask b_u

    @classmethod
    def generate(cls) -> RoundKeys:
        return cls(X25519PrivateKey.generate(), X25519PrivateKey.generate(), os.urandom(32))

    @property
    def enc_pk(self) -> bytes:
        return public_bytes(self.enc)

    @property
    def mask_pk(self) -> bytes:
        return public_bytes(self.mask)

    @property
    def mask_sk(self) -> bytes:
        return private_bytes(self.mask)


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def private_from_bytes(raw: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(raw)


def pair_seed(own: X25519PrivateKey, other_pk: bytes, a: str, b: str, context: bytes) -> bytes:
    """The mask seed shared by clients `a` and `b` (either side computes it): HKDF of their X25519 secret."""
    lo, hi = sorted((a, b))
    return _agree(own, other_pk, b"swarmlm-secagg/pair-mask/" + context + b"/" + lo.encode() + b"/" + hi.encode())


def pair_cipher(own: X25519PrivateKey, other_pk: bytes, a: str, b: str, context: bytes) -> AESGCM:
    """The AES-GCM key that clients `a` and `b` encrypt their shares under (through the coordinator)."""
    lo, hi = sorted((a, b))
    return AESGCM(_agree(own, other_pk, b"swarmlm-secagg/share-enc/" + context + b"/" + lo.encode() + b"/" +
                         hi.encode()))


def _agree(own: X25519PrivateKey, other_pk: bytes, info: bytes) -> bytes:
    try:
        secret = own.exchange(X25519PublicKey.from_public_bytes(other_pk))
    except ValueError as e:          # a low-order point: all-zero shared secret
        raise IntegrityError(f"an X25519 public key is unusable: {e}") from None
    return derive(secret, info)
