"""Shamir t-of-n secret sharing over the prime field GF(2^521 - 1), on Python integers.

A 32-byte secret (a mask seed, an X25519 private key) is one field element: 2^521 - 1 is a
Mersenne prime larger than any 256-bit value, so no secret is ever split into pieces. A share
is `(x, y)` with x in 1..n (x = 0 would be the secret itself). Reconstruction uses Lagrange
interpolation at 0 from the first t shares and, when more arrive, checks that every other
share lies on the same polynomial: a client that hands out inconsistent shares, or a survivor
that reveals a wrong one, is caught whenever more than t shares come in. With exactly t
shares the caller checks the result against a commitment (a public key, a seed's hash).
Knows nothing of peers, rounds or masks.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Sequence

from swarmlm.errors import IntegrityError

PRIME = (1 << 521) - 1
SECRET_BYTES = 32
SHARE_BYTES = 66           # a field element, big-endian (521 bits fit in 66 bytes)


@dataclass(frozen=True)
class Share:
    x: int                 # the holder's point, 1..n_max
    y: int                 # the polynomial's value there, 0 <= y < PRIME

    def to_bytes(self) -> bytes:
        return self.x.to_bytes(4, "big") + self.y.to_bytes(SHARE_BYTES, "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        if len(data) != 4 + SHARE_BYTES:
            raise IntegrityError(f"a Shamir share is {4 + SHARE_BYTES} bytes, got {len(data)}")
        return check_share(cls(int.from_bytes(data[:4], "big"), int.from_bytes(data[4:], "big")))


def check_share(share: Share) -> Share:
    """A share whose point and value are in range, or `IntegrityError`."""
    if not (isinstance(share.x, int) and isinstance(share.y, int)):
        raise IntegrityError("a Shamir share holds two integers")
    if not 0 < share.x < (1 << 31):
        raise IntegrityError(f"a Shamir share's point must be positive, got {share.x}")
    if not 0 <= share.y < PRIME:
        raise IntegrityError("a Shamir share's value is outside the field")
    return share


def split(secret: bytes, points: Sequence[int], threshold: int) -> list[Share]:
    """Shares of `secret` (32 bytes) at `points`; any `threshold` of them give it back, fewer give nothing."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"a secret is {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= len(points):
        raise ValueError(f"threshold {threshold} must be between 1 and the {len(points)} holders")
    if len(set(points)) != len(points) or any(not 0 < x < (1 << 31) for x in points):
        raise ValueError("share points must be distinct positive integers")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return [Share(x, _evaluate(coeffs, x)) for x in points]


def combine(shares: Sequence[Share], threshold: int) -> bytes:
    """The secret behind `shares` (at least `threshold`, all on one polynomial of degree threshold - 1).

    `IntegrityError` if there are too few, if two share one point, if one is out of range, or
    if the shares beyond the first `threshold` disagree with the polynomial the first ones fix.
    """
    shares = [check_share(s) for s in shares]
    if len(shares) < threshold:
        raise IntegrityError(f"{len(shares)} shares, fewer than the threshold of {threshold}")
    if len({s.x for s in shares}) != len(shares):
        raise IntegrityError("two shares for the same point")
    base = shares[:threshold]
    for extra in shares[threshold:]:
        if _interpolate(base, extra.x) != extra.y:
            raise IntegrityError(f"the share at point {extra.x} is inconsistent with the others")
    value = _interpolate(base, 0)
    if value >= 1 << (8 * SECRET_BYTES):
        raise IntegrityError("the shares combine to a value that is no 32-byte secret")
    return value.to_bytes(SECRET_BYTES, "big")


def _evaluate(coeffs: Sequence[int], x: int) -> int:
    acc = 0
    for c in reversed(coeffs):                 # Horner
        acc = (acc * x + c) % PRIME
    return acc


def _interpolate(shares: Sequence[Share], at: int) -> int:
    """The value at `at` of the polynomial through `shares` (Lagrange)."""
    total = 0
    for i, si in enumerate(shares):
        num, den = 1, 1
        for j, sj in enumerate(shares):
            if i != j:
                num = num * (at - sj.x) % PRIME
                den = den * (si.x - sj.x) % PRIME
        total = (total + si.y * num * pow(den, -1, PRIME)) % PRIME
    return total
