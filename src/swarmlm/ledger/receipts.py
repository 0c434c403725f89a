"""EIP-712 receipts and round records, computed and signed off chain exactly as Ledger.vy checks them.

A receipt says "server S has served client C `tokens` tokens in epoch E" (cumulative over that
channel); the client signs it with its ledger key (secp256k1, via coincurve). A ticket is what a
client hands a server when it opens a session: its latest cumulative receipt for that server and
epoch, plus how many new tokens per row the session may generate (what the new receipt pays for).
Tickets are msgpack with checked fields; a bad one is a `WireError`. Knows nothing of the chain or
of sessions.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack
from coincurve import PrivateKey, PublicKey
from eth_abi import encode as abi_encode
from eth_hash.auto import keccak

from swarmlm.errors import IntegrityError, WireError

DOMAIN_TYPEHASH = keccak(b"EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)")
RECEIPT_TYPEHASH = keccak(b"Receipt(address client,address server,uint256 epoch,uint256 tokens)")
ROUND_TYPEHASH = keccak(b"Round(bytes32 run,uint256 round,uint256 epoch,bytes32 members,bytes32 samples)")
MAX_TICKET_BYTES = 512
MAX_TOKENS = 2 ** 64


def domain_separator(chain_id: int, ledger: str) -> bytes:
    return keccak(abi_encode(["bytes32", "bytes32", "bytes32", "uint256", "address"],
                             [DOMAIN_TYPEHASH, keccak(b"swarmlm-ledger"), keccak(b"1"), chain_id, ledger]))


def _word(value: int) -> bytes:
    return value.to_bytes(32, "big")


def receipt_digest(domain: bytes, client: str, server: str, epoch: int, tokens: int) -> bytes:
    """ABI-encoded by hand (static types only: five 32-byte words), as eth_abi would, ~20x faster:
    every session's ticket is hashed by its client and by its server."""
    h = keccak(RECEIPT_TYPEHASH + bytes(12) + bytes.fromhex(client[2:]) + bytes(12) + bytes.fromhex(server[2:])
               + _word(epoch) + _word(tokens))
    return keccak(b"\x19\x01" + domain + h)


def round_digest(domain: bytes, run: bytes, round_: int, epoch: int, members: list[str], samples: list[int]) -> bytes:
    h = keccak(abi_encode(["bytes32", "bytes32", "uint256", "uint256", "bytes32", "bytes32"],
                          [ROUND_TYPEHASH, run, round_, epoch, keccak(abi_encode(["address[]"], [members])),
                           keccak(abi_encode(["uint256[]"], [samples]))]))
    return keccak(b"\x19\x01" + domain + h)


def run_tag(run_id: str) -> bytes:
    """A training run's name as the contract's bytes32: the name itself, zero-padded, if it fits, else its keccak."""
    raw = run_id.encode()
    return raw.ljust(32, b"\0") if len(raw) <= 32 else keccak(raw)


def address_of(key: bytes) -> str:
    """The checksummed Ethereum address of a 32-byte secp256k1 private key."""
    pub = PrivateKey(key).public_key.format(compressed=False)[1:]
    return _checksum(keccak(pub)[-20:])


def _checksum(raw: bytes) -> str:
    hexaddr = raw.hex()
    digest = keccak(hexaddr.encode()).hex()
    return "0x" + "".join(c.upper() if int(digest[i], 16) >= 8 else c for i, c in enumerate(hexaddr))


def checksum(address: str) -> str:
    """`address` (0x + 40 hex digits) checksummed; ValueError if it is not one."""
    if not (isinstance(address, str) and len(address) == 42 and address.startswith("0x")):
        raise ValueError(f"not an address: {address!r}")
    return _checksum(bytes.fromhex(address[2:]))


def sign_digest(key: bytes, digest: bytes) -> bytes:
    """65 bytes r || s || v with v in {27, 28}; libsecp256k1 gives the low s the contract requires."""
    sig = PrivateKey(key).sign_recoverable(digest, hasher=None)
    return sig[:64] + bytes([sig[64] + 27])


def recover(digest: bytes, signature: bytes) -> str:
    """The address that signed `digest`; `IntegrityError` for a malformed signature."""
    if len(signature) != 65 or signature[64] not in (27, 28):
        raise IntegrityError("a signature is 65 bytes ending in v = 27 or 28")
    try:
        pub = PublicKey.from_signature_and_message(signature[:64] + bytes([signature[64] - 27]), digest, hasher=None)
    except Exception as e:        # coincurve raises plain Exceptions for unrecoverable signatures
        raise IntegrityError(f"unrecoverable signature: {e}") from None
    return _checksum(keccak(pub.format(compressed=False)[1:])[-20:])


def split_signature(signature: bytes) -> tuple[int, bytes, bytes]:
    """(v, r, s) as the contract's functions take them."""
    return signature[64], signature[:32], signature[32:64]


@dataclass(frozen=True)
class Ticket:
    client: str              # the client's ledger address (checksummed)
    epoch: int               # the epoch the receipt is for
    tokens: int              # cumulative tokens of channel (client, server, epoch), this session included
    new_tokens: int          # tokens per row this session may generate (its prepaid part: batch * new_tokens)
    signature: bytes         # the client's signature over the receipt

    def encode(self) -> bytes:
        return msgpack.packb({"client": self.client, "epoch": self.epoch, "tokens": self.tokens,
                              "new": self.new_tokens, "sig": self.signature})


def decode_ticket(data: bytes) -> Ticket:
    if not isinstance(data, bytes) or len(data) > MAX_TICKET_BYTES:
        raise WireError(f"a ledger ticket is at most {MAX_TICKET_BYTES} bytes")
    try:
        d = msgpack.unpackb(data, raw=False)
    except Exception as e:
        raise WireError(f"a ledger ticket that does not decode: {e}") from None
    if not isinstance(d, dict) or set(d) != {"client", "epoch", "tokens", "new", "sig"}:
        raise WireError("a ledger ticket needs exactly client, epoch, tokens, new, sig")
    client, epoch, tokens, new, sig = d["client"], d["epoch"], d["tokens"], d["new"], d["sig"]
    if not (isinstance(client, str) and len(client) == 42 and client.startswith("0x")):
        raise WireError("a ticket's client is a 0x address")
    for name, v in (("epoch", epoch), ("tokens", tokens), ("new", new)):
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < MAX_TOKENS:
            raise WireError(f"a ticket's {name} is an integer in [0, 2^64)")
    if not isinstance(sig, bytes) or len(sig) != 65:
        raise WireError("a ticket's signature is 65 bytes")
    try:
        checksummed = _checksum(bytes.fromhex(client[2:]))
    except ValueError:
        raise WireError("a ticket's client is not hex") from None
    return Ticket(client=checksummed, epoch=epoch, tokens=tokens, new_tokens=new, signature=sig)


def sign_ticket(key: bytes, domain: bytes, server: str, epoch: int, tokens: int, new_tokens: int, *,
                client: str | None = None) -> Ticket:
    """`client`: the key's address, if the caller knows it already (saves deriving it)."""
    client = client or address_of(key)
    sig = sign_digest(key, receipt_digest(domain, client, server, epoch, tokens))
    return Ticket(client=client, epoch=epoch, tokens=tokens, new_tokens=new_tokens, signature=sig)
