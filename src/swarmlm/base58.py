"""base58btc, the alphabet of libp2p peer IDs ("12D3KooW...") and CIDv0s ("Qm...").

    encode(data: bytes) -> str
    decode(text: str) -> bytes      ValueError on a character outside the alphabet

Each leading zero byte is written as a leading "1", as Bitcoin and multiformats do. One codec
for p2p/identity.py and store/cid.py, so neither needs the PyPI `base58` package. Imports
nothing from swarmlm.
"""

ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_INDEX = {c: i for i, c in enumerate(ALPHABET)}


def encode(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, r = divmod(n, 58)
        out.append(ALPHABET[r])
    zeros = len(data) - len(data.lstrip(b"\0"))
    return "1" * zeros + "".join(reversed(out))


def decode(text: str) -> bytes:
    n = 0
    for c in text:
        i = _INDEX.get(c)
        if i is None:
            raise ValueError(f"{c!r} is not a base58 character")
        n = n * 58 + i
    zeros = len(text) - len(text.lstrip("1"))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\0" * zeros + body
