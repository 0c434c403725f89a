"""The ring Z_2^64 on torch.int64 tensors, fixed-point encoding, and the parties' PRG.

Values are fixed point with `FRAC_BITS` fractional bits: x -> round(x * 2^f) as int64, and
torch's int64 add / mul / matmul wrap modulo 2^64, which is the ring's arithmetic. A product
of two encoded values carries 2f fractional bits until it is truncated (ops.py).

`Prg` is AES-256 in counter mode keyed by a seed two parties share: both draw the same
stream, in the same order, so correlated randomness (zero shares, truncation masks) costs no
message. Knows nothing of parties or messages.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

FRAC_BITS = 16                 # f: fractional bits of every shared value
SCALE = 1 << FRAC_BITS
MASK_BITS = 62                 # truncation / comparison masks are uniform in [0, 2^62): statistical hiding
SEED_BYTES = 32
_ZEROS = memoryview(bytes(1 << 22))
BIG_DRAW = 1 << 16          # draws from this many bytes on are written in place (faster for large ones)


def encode(x: torch.Tensor | float, frac_bits: int = FRAC_BITS) -> torch.Tensor:
    """Real values -> fixed point int64 (rounded to nearest), computed in float64."""
    t = torch.as_tensor(x, dtype=torch.float64)
    return torch.round(t * float(1 << frac_bits)).to(torch.int64)


def decode(x: torch.Tensor, frac_bits: int = FRAC_BITS) -> torch.Tensor:
    """Fixed point int64 -> float64."""
    return x.to(torch.float64) / float(1 << frac_bits)


class Prg:
    """A deterministic stream of uniform ring elements (or bits) from a 32-byte seed."""

    def __init__(self, seed: bytes, label: str = ""):
        if len(seed) != SEED_BYTES:
            raise ValueError(f"a PRG seed is {SEED_BYTES} bytes")
        key = hashlib.sha256(seed + b"\0" + label.encode()).digest()
        # one counter-mode stream per (seed, label), continued from draw to draw: every draw takes
        # fresh keystream blocks (a new counter start per draw would overlap the previous draw's)
        self._enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()

    def _bytes(self, n: int) -> np.ndarray:
        """The next n bytes of the stream (uint8, writable, owned)."""
        enc = self._enc
        if n < BIG_DRAW:
            return np.frombuffer(enc.update(bytes(n)), dtype=np.uint8).copy()
        out = np.empty(n + 15, dtype=np.uint8)                  # update_into wants a block of room
        zeros = _ZEROS[:n] if n <= len(_ZEROS) else bytes(n)    # the plaintext: zeros, shared read-only
        enc.update_into(zeros, out)                             # no intermediate bytes object, no copy
        return out[:n]

    def ring(self, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """Uniform int64 over the whole ring."""
        return torch.from_numpy(self._bytes(8 * math.prod(shape)).view(np.int64)).view(*shape)

    def below(self, shape: tuple[int, ...] | torch.Size, bits: int = MASK_BITS) -> torch.Tensor:
        """Uniform int64 in [0, 2^bits), drawn from the fewest whole bytes of 1, 2, 4 or 8 an element."""
        if bits > 32:
            return self.ring(shape) & ((1 << bits) - 1)
        dtype = np.uint8 if bits <= 8 else np.uint16 if bits <= 16 else np.uint32
        n = math.prod(shape)
        raw = self._bytes(np.dtype(dtype).itemsize * n).view(dtype)
        return torch.from_numpy(raw.astype(np.int64)).view(*shape) & ((1 << bits) - 1)

    def small(self, shape: tuple[int, ...] | torch.Size, bits: int) -> torch.Tensor:
        """Uniform uint8 in [0, 2^bits), bits <= 8 (one byte of the stream an element)."""
        assert bits <= 8
        raw = self._bytes(math.prod(shape))
        raw &= (1 << bits) - 1
        return torch.from_numpy(raw).view(*shape)

    def unsigned(self, shape: tuple[int, ...] | torch.Size, width: int) -> np.ndarray:
        """Uniform unsigned numpy words of `width` bits (8, 16, 32 or 64): the stream's next width / 8
        bytes an element."""
        dtype = {8: np.uint8, 16: np.uint16, 32: np.uint32, 64: np.uint64}[width]
        return self._bytes(width // 8 * math.prod(shape)).view(dtype).reshape(tuple(shape))

    def bits(self, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """Uniform bool tensor."""
        n = math.prod(shape)
        raw = np.unpackbits(self._bytes((n + 7) // 8), count=n)
        return torch.from_numpy(raw.astype(np.bool_)).view(*shape)


def limb_bits(w: torch.Tensor) -> int:
    """public_matmul's limb size for w (0: too wide, use int64)."""
    K = w.shape[-2]
    wbits = int(w.abs().max()).bit_length() if w.numel() else 0
    L = 52 - wbits - max(K, 1).bit_length()
    return L if L >= 12 else 0


def public_matmul(x: torch.Tensor, w: torch.Tensor, wf: torch.Tensor | None = None, L: int | None = None) -> torch.Tensor:
    """x @ w in the ring (int64, wrapping; broadcasting as torch.matmul, x at least 2-D) for a public
    w of small entries, by float64 products: x is cut into limbs of L bits (its two's complement,
    low limb first), L small enough that a limb's products with w, summed over K, stay below 2^53
    and so are exact; the limbs' products are shifted back and added modulo 2^64. The limbs are
    stacked as rows of one product, so w is read once (batched products of one row per weight
    matrix are memory-bound). For batched products, which torch runs on int64 without BLAS.
    `wf` (w as float64) and `L` (limb_bits) may be given, computed once."""
    L = limb_bits(w) if L is None else L
    if not L:
        return x @ w
    wf = w.to(torch.float64) if wf is None else wf
    rows = x.shape[-2]
    starts = list(range(0, 64, L))
    limbs = torch.cat([((x >> j) & ((1 << L) - 1)) for j in starts], -2).to(torch.float64)   # (..., n * rows, K)
    prods = (limbs @ wf).to(torch.int64)
    out = prods[..., :rows, :]
    for n, j in enumerate(starts[1:], 1):
        out = out + (prods[..., n * rows:(n + 1) * rows, :] << j)
    return out
