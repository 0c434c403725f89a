"""Fixed-point encoding into the ring Z/2^32, and masks expanded from 32-byte seeds.

Updates are float vectors; secure aggregation adds them in a finite ring so that a mask
drawn uniformly from the ring hides each one completely. `FixedPoint` clips every coordinate
to [-clip, clip] and scales by a power of two chosen so that the sum of `max_clients`
encoded inputs stays inside the signed range of 32 bits: the sum can never wrap, so the
decoded sum is exact up to the rounding of each input (at most 0.5/scale per coordinate
and client). A masked input is as large as the float32 update it replaces (4 bytes per
coordinate), which is why the ring is 2^32 and not 2^64.

Masks come from AES-256 in counter mode keyed by the seed (the PRG of Bonawitz et al. §4):
uniform 32-bit words, expanded at memory speed. Knows nothing of peers, keys or stages.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from swarmlm.errors import IntegrityError, WireError

RING_BITS = 32
RING_DTYPE = np.dtype("<u4")
SEED_BYTES = 32


@dataclass(frozen=True)
class FixedPoint:
    """How floats become ring elements for one round."""
    clip: float = 1.0          # every coordinate is clipped to [-clip, clip] before encoding
    max_clients: int = 1000    # the sum of this many encoded inputs cannot wrap around the ring

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"clip must be a positive number, got {self.clip}")
        if not 1 <= self.max_clients < 1 << 20:
            raise ValueError(f"max_clients must be between 1 and 2^20, got {self.max_clients}")

    @property
    def scale(self) -> float:
        """A power of two: |sum| <= max_clients * clip * scale < 2^31."""
        bound = ((1 << (RING_BITS - 1)) - 1) / (self.max_clients * self.clip)
        return 2.0 ** math.floor(math.log2(bound))

    def encode(self, x: np.ndarray) -> np.ndarray:
        """float vector (d,) -> ring vector (d,) uint32; `ValueError` for a non-finite value."""
        x = np.asarray(x).reshape(-1)
        out = np.zeros(x.size, dtype=RING_DTYPE)
        self.add_encoded(out, x)
        return out

    def add_encoded(self, acc: np.ndarray, x: np.ndarray, scratch: np.ndarray | None = None) -> None:
        """acc += encode(x), mod 2^32, in place (a client adds its input to its prepared masks);
        `ValueError` for a non-finite value, leaving `acc` as it was. `scratch`: d float64, reused."""
        x = np.asarray(x).reshape(-1)
        if x.size != acc.size:
            raise ValueError(f"an input of {x.size} coordinates for a ring vector of {acc.size}")
        y = np.multiply(x, self.scale, out=scratch, dtype=np.float64)        # exact: scale is 2^k
        lo, hi = float(y.min(initial=0)), float(y.max(initial=0))           # NaN propagates into both
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError("an update to encode holds NaN or infinity")
        limit = self.clip * self.scale
        if lo < -limit or hi > limit:                                        # else already in range
            np.clip(y, -limit, limit, out=y)
        # |y| < 2^31: adding 1.5 * 2^52 rounds it half to even (as np.rint) and leaves the integer in
        # the double's low mantissa bits, in two's complement: its low 32-bit word is y mod 2^32
        y += _ROUNDER
        np.add(acc, y.view(np.uint32)[_LOW_WORD::2], out=acc)

    def decode_sum(self, s: np.ndarray, n_inputs: int) -> np.ndarray:
        """The ring sum of `n_inputs` encoded inputs -> float64 (d,); `IntegrityError` if it cannot be one."""
        if s.dtype != RING_DTYPE and s.dtype != np.uint32:
            raise WireError(f"a ring vector is uint32, got {s.dtype}")
        signed = s.view(np.int32)
        bound = n_inputs * self.clip * self.scale
        # the extremes of the int32 view: no float copy, no abs temporary (-2^31 is below any bound)
        if n_inputs > self.max_clients or (signed.size and max(-int(signed.min()), int(signed.max())) > bound):
            raise IntegrityError(f"the unmasked sum of {n_inputs} inputs is out of their range: a mask did not cancel")
        out = signed.astype(np.float64)
        out *= 1.0 / self.scale                        # exact: the scale is a power of two
        return out

    def decode_one(self, q: np.ndarray) -> np.ndarray:
        return self.decode_sum(q, 1)


_ROUNDER = 1.5 * 2.0 ** 52
_LOW_WORD = 0 if sys.byteorder == "little" else 1     # which uint32 of a float64 holds its low mantissa bits

_zeros = b""                                   # the keystream is AES-CTR over zeros; kept between calls


def expand(seed: bytes, n: int, *, context: bytes = b"", out: np.ndarray | None = None) -> np.ndarray:
    """`n` uniform ring elements (uint32) from a 32-byte seed; `context` separates uses of one seed.
    `out`: a uint32 buffer of at least n + 4 elements to write into (a caller's reused scratch)."""
    global _zeros
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a mask seed is {SEED_BYTES} bytes")
    key = seed if not context else derive(seed, b"swarmlm-secagg/prg/" + context)
    if len(_zeros) < 4 * n:
        _zeros = bytes(4 * n)                        # read-only: safe to share between threads
    if out is None or out.dtype != RING_DTYPE or out.size < n + 4 or not out.flags.c_contiguous:
        out = np.empty(n + 4, dtype=RING_DTYPE)      # update_into wants room for one block more
    enc = Cipher(algorithms.AES(key), modes.CTR(b"\0" * 16)).encryptor()
    written = enc.update_into(memoryview(_zeros)[:4 * n], memoryview(out).cast("B"))
    assert written == 4 * n, "CTR mode is a stream: it writes all it is given"
    return out[:n]


def scratch(n: int) -> np.ndarray:
    """A buffer for `expand(..., out=)` of n elements: one per caller and thread, reused across masks."""
    return np.empty(n + 4, dtype=RING_DTYPE)


def add_mask(acc: np.ndarray, seed: bytes, *, context: bytes = b"", subtract: bool = False,
             buffer: np.ndarray | None = None) -> None:
    """acc += PRG(seed) (or -=), mod 2^32, in place; `buffer` (from `scratch`) saves an allocation."""
    mask = expand(seed, acc.size, context=context, out=buffer)
    if subtract:
        np.subtract(acc, mask, out=acc)
    else:
        np.add(acc, mask, out=acc)


def derive(secret: bytes, info: bytes, n_bytes: int = 32) -> bytes:
    """HKDF-SHA256 of `secret` for the purpose named by `info`."""
    return HKDF(algorithm=hashes.SHA256(), length=n_bytes, salt=None, info=info).derive(secret)


def ring_from_bytes(data: bytes | bytearray | memoryview, n: int) -> np.ndarray:
    """A ring vector of exactly `n` elements from the wire, or `WireError`."""
    if len(data) != 4 * n:
        raise WireError(f"a ring vector of {n} elements is {4 * n} bytes, got {len(data)}")
    return np.frombuffer(data, dtype=RING_DTYPE)


def ring_view(v: np.ndarray) -> memoryview:
    """A ring vector's bytes as they go on the wire, without a copy (compact messages join it once)."""
    return memoryview(np.ascontiguousarray(v, dtype=RING_DTYPE)).cast("B")
