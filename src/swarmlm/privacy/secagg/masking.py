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
        y = np.multiply(np.asarray(x).reshape(-1), self.scale, dtype=np.float64)     # exact: scale is 2^k
        limit = self.clip * self.scale
        if not max(float(y.max(initial=0)), -float(y.min(initial=0))) < np.inf:    # NaN fails this too
            raise ValueError("an update to encode holds NaN or infinity")
        np.minimum(y, limit, out=y)
        np.maximum(y, -limit, out=y)
        np.rint(y, out=y)
        return y.astype(np.int32).view(np.uint32)      # |y| < 2^31; two's complement: -1 -> 2^32 - 1

    def decode_sum(self, s: np.ndarray, n_inputs: int) -> np.ndarray:
        """The ring sum of `n_inputs` encoded inputs -> float64 (d,); `IntegrityError` if it cannot be one."""
        if s.dtype != RING_DTYPE and s.dtype != np.uint32:
            raise WireError(f"a ring vector is uint32, got {s.dtype}")
        signed = s.view(np.int32).astype(np.float64)
        if n_inputs > self.max_clients or np.abs(signed).max(initial=0) > n_inputs * self.clip * self.scale:
            raise IntegrityError(f"the unmasked sum of {n_inputs} inputs is out of their range: a mask did not cancel")
        return signed / self.scale

    def decode_one(self, q: np.ndarray) -> np.ndarray:
        return self.decode_sum(q, 1)


_zeros = b""                                   # the keystream is AES-CTR over zeros; kept between calls


def expand(seed: bytes, n: int, *, context: bytes = b"") -> np.ndarray:
    """`n` uniform ring elements (uint32) from a 32-byte seed; `context` separates uses of one seed."""
    global _zeros
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a mask seed is {SEED_BYTES} bytes")
    key = seed if not context else derive(seed, b"swarmlm-secagg/prg/" + context)
    if len(_zeros) < 4 * n:
        _zeros = bytes(4 * n)                        # read-only: safe to share between threads
    out = np.empty(n + 4, dtype=RING_DTYPE)          # update_into wants room for one block more
    enc = Cipher(algorithms.AES(key), modes.CTR(b"\0" * 16)).encryptor()
    written = enc.update_into(memoryview(_zeros)[:4 * n], memoryview(out).cast("B"))
    assert written == 4 * n, "CTR mode is a stream: it writes all it is given"
    return out[:n]


def add_mask(acc: np.ndarray, seed: bytes, *, context: bytes = b"", subtract: bool = False) -> None:
    """acc += PRG(seed) (or -=), mod 2^32, in place."""
    mask = expand(seed, acc.size, context=context)
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


def ring_to_bytes(v: np.ndarray) -> bytes:
    return np.ascontiguousarray(v, dtype=RING_DTYPE).tobytes()
