"""Typed, signed DHT records.

Every value swarmlm puts in the DHT is a frozen dataclass registered here under a short
`kind`, wrapped in an envelope signed by the publishing peer:

    envelope = msgpack {kind, key, subkey, body, expires_at, signer, sig}
    body     = serialize.encode_message(record)
    sig      = Ed25519 over msgpack ["swarmlm-record/1", kind, key, subkey, body, expires_at, signer]

Reading checks, in order: the envelope's shape, the signature against the signer's peer ID,
that a subkey belongs to its signer (`keys.subkey_owner`), that the record sits under the key
it was signed for, and finally the body against its dataclass (`serialize.message_from_dict`).
A record type may add a `check()` method raising `ValueError` for rules beyond field types
(a negative size, say). A record that fails any check is dropped and logged by the reader,
never raised to it.
Knows nothing of hivemind; the DHT-side validator in peer.py calls `unseal`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from swarmlm import serialize
from swarmlm.errors import IntegrityError, WireError
from swarmlm.p2p import identity as ident
from swarmlm.p2p.identity import Identity
from swarmlm.p2p.keys import subkey_owner

MAX_RECORD_BYTES = 64 * 1024     # one envelope; records are small metadata, never payload
_DOMAIN = "swarmlm-record/1"
_ENVELOPE_FIELDS = {"kind", "key", "subkey", "body", "expires_at", "signer", "sig"}

RECORD_TYPES: dict[str, type] = {}
_KINDS: dict[type, str] = {}
T = TypeVar("T")


def record_type(kind: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: register a frozen dataclass as the DHT record type `kind`."""
    def register(cls: type[T]) -> type[T]:
        if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:
            raise TypeError(f"{cls.__name__} must be a frozen dataclass to be a DHT record")
        if RECORD_TYPES.get(kind, cls) is not cls:
            raise ValueError(f"record kind {kind!r} is already taken by {RECORD_TYPES[kind].__name__}")
        RECORD_TYPES[kind] = cls
        _KINDS[cls] = kind
        return cls
    return register


@dataclass(frozen=True)
class Envelope:
    """A record whose signature and ownership have been checked, body still undecoded."""
    kind: str
    key: str
    subkey: str | None
    body: bytes               # serialize.encode_message of the record
    expires_at: float         # DHT time (Unix seconds); the DHT must not keep it longer
    signer: str               # base58 peer ID of the publisher


@dataclass(frozen=True)
class SignedRecord:
    """What `Peer.get` returns: a checked record and who vouched for it."""
    key: str
    subkey: str | None        # None for a plain (non-dictionary) value
    value: Any                # an instance of the registered dataclass
    signer: str               # base58 peer ID
    expires_at: float


def _signed_bytes(kind: str, key: str, subkey: str | None, body: bytes, expires_at: float, signer: str) -> bytes:
    return serialize.pack([_DOMAIN, kind, key, subkey, body, expires_at, signer])


def seal(identity: Identity, key: str, value: Any, *, expires_at: float, subkey: str | None = None) -> bytes:
    """Sign `value` (a registered record) for `key`/`subkey` as `identity`; returns the envelope bytes."""
    kind = _KINDS.get(type(value))
    if kind is None:
        raise TypeError(f"{type(value).__name__} is not a registered DHT record type (see records.record_type)")
    if subkey is not None and subkey_owner(subkey) != identity.peer_id:
        raise ValueError(f"subkey {subkey!r} must start with this peer's ID {identity.peer_id}")
    body = serialize.encode_message(value)
    expires_at = float(expires_at)
    sig = identity.sign(_signed_bytes(kind, key, subkey, body, expires_at, identity.peer_id))
    envelope = serialize.pack({"kind": kind, "key": key, "subkey": subkey, "body": body,
                               "expires_at": expires_at, "signer": identity.peer_id, "sig": sig})
    if len(envelope) > MAX_RECORD_BYTES:
        raise ValueError(f"record of {len(envelope)} bytes exceeds the limit of {MAX_RECORD_BYTES}")
    return envelope


def unseal(data: Any) -> Envelope:
    """Check an envelope's shape, signature and subkey ownership; `IntegrityError`/`WireError` if bad."""
    fields = serialize.unpack(data, max_bytes=MAX_RECORD_BYTES)
    if not isinstance(fields, dict) or set(fields) != _ENVELOPE_FIELDS:
        raise WireError("a DHT record must be a map with fields " + ", ".join(sorted(_ENVELOPE_FIELDS)))
    kind, key, subkey, body = fields["kind"], fields["key"], fields["subkey"], fields["body"]
    expires_at, signer, sig = fields["expires_at"], fields["signer"], fields["sig"]
    if not (isinstance(kind, str) and isinstance(key, str) and isinstance(subkey, (str, type(None)))
            and isinstance(body, bytes) and isinstance(expires_at, float) and math.isfinite(expires_at)
            and isinstance(signer, str) and isinstance(sig, bytes)):
        raise WireError("a DHT record field has the wrong type")
    if not ident.verify(signer, _signed_bytes(kind, key, subkey, body, expires_at, signer), sig):
        raise IntegrityError(f"bad signature on a {kind!r} record claiming to be from {signer}")
    if subkey is not None and subkey_owner(subkey) != signer:
        raise IntegrityError(f"{signer} signed a record under subkey {subkey!r}, which belongs to another peer")
    return Envelope(kind, key, subkey, body, expires_at, signer)


def open_record(data: Any, *, key: str, subkey: str | None) -> SignedRecord:
    """Unseal `data` found under `key`/`subkey` and decode its body against its registered type."""
    env = unseal(data)
    if env.key != key or env.subkey != subkey:
        raise IntegrityError(f"a record signed for {env.key!r}/{env.subkey!r} was found under {key!r}/{subkey!r}")
    cls = RECORD_TYPES.get(env.kind)
    if cls is None:
        raise WireError(f"unknown record kind {env.kind!r}")
    value = serialize.decode_message(env.body, cls, max_bytes=MAX_RECORD_BYTES)
    check = getattr(value, "check", None)     # optional per-type rules beyond field types
    if callable(check):
        try:
            check()
        except ValueError as e:
            raise WireError(f"{env.kind} record from {env.signer}: {e}") from None
    return SignedRecord(key=env.key, subkey=env.subkey, value=value, signer=env.signer, expires_at=env.expires_at)
