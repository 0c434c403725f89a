"""Content identifiers (CIDs), byte for byte as IPFS writes them; sha2-256 only.

    CIDv1 bytes   varint(1) varint(codec) 0x12 0x20 digest[32]   text: "b" + base32 lower, no padding
    CIDv0 bytes   0x12 0x20 digest[32]  (dag-pb implied)         text: base58btc, always "Qm..."

Codecs: raw (0x55) for file chunks, dag-pb (0x70) for UnixFS nodes, dag-json (0x0129) for
model manifests. `Cid.parse` / `Cid.from_bytes` raise `CidError` on anything malformed (`parse`
quoting the text); it is both a `UserError` (a CID typed on the command line) and a `WireError`
(a CID from a peer), so either kind of caller catches it. base58 is the leaf `swarmlm.base58`.
Knows nothing of blocks on disk or files.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

from swarmlm import base58
from swarmlm.errors import IntegrityError, UserError, WireError

RAW = 0x55
DAG_PB = 0x70
DAG_JSON = 0x0129
CODECS = {RAW: "raw", DAG_PB: "dag-pb", DAG_JSON: "dag-json"}

SHA2_256 = 0x12
DIGEST_BYTES = 32
MAX_CID_CHARS = 128          # a sha2-256 CIDv1 is 59 characters; anything far longer is garbage

_B32 = frozenset("abcdefghijklmnopqrstuvwxyz234567")


class CidError(UserError, WireError):
    """A CID that does not parse, or names a codec or hash this store does not handle."""


@dataclass(frozen=True)
class Cid:
    version: int       # 0 or 1
    codec: int         # RAW, DAG_PB or DAG_JSON; always DAG_PB for version 0
    digest: bytes      # the sha2-256 of the block, 32 bytes

    def __post_init__(self):
        if self.version not in (0, 1):
            raise CidError(f"CID version must be 0 or 1, got {self.version}")
        if self.codec not in CODECS:
            raise CidError(f"unsupported CID codec 0x{self.codec:x} (supported: raw, dag-pb, dag-json)")
        if self.version == 0 and self.codec != DAG_PB:
            raise CidError("a CIDv0 is always dag-pb")
        if not isinstance(self.digest, bytes) or len(self.digest) != DIGEST_BYTES:
            raise CidError("a sha2-256 digest has 32 bytes")

    # ---- construction -----------------------------------------------------------------------

    @classmethod
    def of(cls, block: bytes | memoryview, codec: int = RAW, version: int = 1) -> "Cid":
        """The CID of `block` under `codec` and `version`."""
        return cls(version, codec, hashlib.sha256(block).digest())

    @classmethod
    def parse(cls, text: str) -> "Cid":
        """A CID from its text form ("Qm..." or "b..."); `CidError` quoting the text if malformed."""
        if not isinstance(text, str):
            raise CidError(f"a CID must be a string, got {type(text).__name__}")
        try:
            return cls._parse(text)
        except CidError as e:
            shown = text if len(text) <= 70 else text[:67] + "..."
            raise CidError(f"malformed CID {shown!r}: {e}") from None

    @classmethod
    def _parse(cls, text: str) -> "Cid":
        """`parse` without the quoting: each `CidError` says only what is wrong."""
        if not text or len(text) > MAX_CID_CHARS:
            raise CidError("wrong length")
        if len(text) == 46 and text.startswith("Qm"):
            try:
                return cls._decode(base58.decode(text))
            except ValueError:
                raise CidError("not base58") from None
        if text[0] != "b":
            raise CidError("expected 'Qm...' (v0) or base32 'b...' (v1)")
        body = text[1:]
        if not body or not set(body) <= _B32:
            raise CidError("not lower-case base32")
        try:
            raw = base64.b32decode(body.upper() + "=" * (-len(body) % 8))
        except (binascii.Error, ValueError):
            raise CidError("bad base32") from None
        cid = cls._decode(raw)
        if cid.version == 0:
            raise CidError("a v0 CID cannot be written in base32")
        return cid

    @classmethod
    def from_bytes(cls, data: bytes) -> "Cid":
        """A CID from its binary form (as in a dag-pb link); `CidError` if malformed."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise CidError(f"a binary CID must be bytes, got {type(data).__name__}")
        try:
            return cls._decode(bytes(data))
        except CidError as e:
            raise CidError(f"malformed binary CID: {e}") from None

    @classmethod
    def _decode(cls, data: bytes) -> "Cid":
        if len(data) == 2 + DIGEST_BYTES and data[0] == SHA2_256 and data[1] == DIGEST_BYTES:
            return cls(0, DAG_PB, data[2:])
        version, pos = read_varint(data, 0, CidError)
        if version != 1:
            raise CidError(f"version {version} (only 0 and 1)")
        codec, pos = read_varint(data, pos, CidError)
        hash_code, pos = read_varint(data, pos, CidError)
        size, pos = read_varint(data, pos, CidError)
        if hash_code != SHA2_256:
            raise CidError(f"unsupported multihash 0x{hash_code:x} (only sha2-256)")
        if size != DIGEST_BYTES or len(data) - pos != DIGEST_BYTES:
            raise CidError(f"a {len(data) - pos}-byte digest where sha2-256 has {DIGEST_BYTES}")
        return cls(1, codec, data[pos:])

    # ---- encoding ---------------------------------------------------------------------------

    @property
    def multihash(self) -> bytes:
        return bytes((SHA2_256, DIGEST_BYTES)) + self.digest

    def to_bytes(self) -> bytes:
        if self.version == 0:
            return self.multihash
        return encode_varint(1) + encode_varint(self.codec) + self.multihash

    def encode(self) -> str:
        text = self.__dict__.get("_text")          # computed once: CIDs are keys and log words everywhere
        if text is None:
            if self.version == 0:
                text = base58.encode(self.multihash)
            else:
                text = "b" + base64.b32encode(self.to_bytes()).decode("ascii").lower().rstrip("=")
            object.__setattr__(self, "_text", text)
        return text

    def to_v1(self) -> "Cid":
        return self if self.version == 1 else Cid(1, self.codec, self.digest)

    def __str__(self) -> str:
        return self.encode()

    def __repr__(self) -> str:
        return f"Cid({self.encode()!r})"


def verify(cid: Cid, block: bytes | memoryview) -> None:
    """Raise `IntegrityError` unless `block` hashes to `cid`."""
    if hashlib.sha256(block).digest() != cid.digest:
        raise IntegrityError(f"block of {len(block)} bytes does not match its CID {cid}")


def block_matches(cid: Cid, block: bytes | memoryview) -> bool:
    return hashlib.sha256(block).digest() == cid.digest


# ---- varints (unsigned LEB128, as multiformats and protobuf use them) -----------------------

def encode_varint(n: int) -> bytes:
    if n < 0:
        raise ValueError("varints are unsigned")
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def read_varint(data: bytes | memoryview, pos: int, error: type[Exception] = WireError) -> tuple[int, int]:
    """(value, position after it); `error` if truncated or longer than 9 bytes (values < 2^63)."""
    value = shift = 0
    for i in range(pos, min(pos + 9, len(data))):
        byte = data[i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if byte == 0 and i > pos:
                raise error("varint is not minimally encoded")
            return value, i + 1
        shift += 7
    raise error("truncated or oversized varint")

