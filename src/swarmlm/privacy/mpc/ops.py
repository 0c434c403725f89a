"""The interactive arithmetic of replicated shares: multiplication, truncation, AND.

Every function here is a protocol (a generator; see runtime.py) run by each party on its own
shares, `x = yield from mul(party, a, b)`.

- Multiplication: party i computes z_i = a_i b_i + a_i b_{i+1} + a_{i+1} b_i (a 3-out-of-3
  sharing of ab), re-randomizes it with a zero share from the pairwise PRGs and sends it to
  party i-1: one round, one ring element per party per product (ABY3 / Araki et al.).
- Truncation (dividing a fixed-point product by 2^f): parties 1 and 2 draw a mask r uniform
  in [0, 2^62) from their shared PRG; party 0 receives z + r (for a product: z_1 + r + m and
  z_2 - m, m a one-time pad) and computes c' = floor((z + r) / 2^f); the result is shared as
  (c' - u, u, -floor(r / 2^f)) with u from the PRG of parties 0 and 1, and party 0 sends
  c' - u to party 2. Two rounds. The result is floor(z / 2^f) or one unit more, never a
  wrap-around error (z + r stays inside int64 as long as |z| < 2^62); party 0 sees z + r,
  which hides z statistically up to 2^-(62 - log2|z|): for values below 2^10 in magnitude
  (products carry 2f = 32 fractional bits) that is 20 bits.
- AND of XOR-shared bits: the same as multiplication over GF(2), one round.
Knows nothing of models.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from swarmlm.privacy.mpc.ring import FRAC_BITS
from swarmlm.privacy.mpc.runtime import Party, Protocol, Round
from swarmlm.privacy.mpc.shares import AShare, BShare

Product = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _spec(shape, dtype=torch.int64):
    return [(tuple(shape), dtype)]


def _cross(x: AShare, y: AShare, fn: Product) -> torch.Tensor:
    """This party's 3-out-of-3 component of fn(x, y) for a bilinear fn."""
    return fn(x.a, y.a) + fn(x.a, y.b) + fn(x.b, y.a)


def reshare(p: Party, z: torch.Tensor) -> Protocol:
    """3-out-of-3 component z_i -> replicated shares of sum z (re-randomized). One round."""
    z = z + p.prg(p.next, "zero").ring(z.shape) - p.prg(p.prev, "zero").ring(z.shape)
    got = yield Round(send={p.prev: [z]}, recv={p.next: _spec(z.shape)})
    return AShare(z, got[p.next][0])


def mul(p: Party, x: AShare, y: AShare, fn: Product = torch.mul) -> Protocol:
    """fn(x, y) without truncation (use when one side is an integer, e.g. a bit)."""
    return (yield from reshare(p, _cross(x, y, fn)))


def trunc_sum(p: Party, z: torch.Tensor, shift: int = FRAC_BITS) -> Protocol:
    """3-out-of-3 component z_i of z -> replicated shares of floor(z / 2^shift) (+0 or +1). Two rounds."""
    shape = z.shape
    if p.index == 0:
        got = yield Round(recv={1: _spec(shape), 2: _spec(shape)})
        c = z + got[1][0] + got[2][0]
        u = p.prg(1, "trunc").ring(shape)
        y0 = (c >> shift) - u
        yield Round(send={2: [y0]})
        return AShare(y0, u)
    prg = p.prg(3 - p.index, "trunc")        # the PRG of parties 1 and 2
    r, m = prg.below(shape), prg.ring(shape)
    if p.index == 1:
        yield Round(send={0: [z + r + m]})
        u = p.prg(0, "trunc").ring(shape)
        yield Round()
        return AShare(u, -(r >> shift))
    yield Round(send={0: [z - m]})
    got = yield Round(recv={0: _spec(shape)})
    return AShare(-(r >> shift), got[0][0])


def trunc(p: Party, x: AShare, shift: int | torch.Tensor = FRAC_BITS) -> Protocol:
    """Replicated x -> replicated floor(x / 2^shift) (+0 or +1). Two rounds; party 0 needs only x_2 + r.
    `shift` may be a tensor broadcasting against x (a public amount per element)."""
    shape = x.shape
    if p.index == 0:
        got = yield Round(recv={1: _spec(shape)})
        c = x.a + x.b + got[1][0]
        u = p.prg(1, "trunc").ring(shape)
        y0 = (c >> shift) - u
        yield Round(send={2: [y0]})
        return AShare(y0, u)
    r = p.prg(3 - p.index, "trunc").below(shape)
    if p.index == 1:
        yield Round(send={0: [x.b + r]})
        u = p.prg(0, "trunc").ring(shape)
        yield Round()
        return AShare(u, -(r >> shift))
    yield Round()
    got = yield Round(recv={0: _spec(shape)})
    return AShare(-(r >> shift), got[0][0])


def mul_trunc(p: Party, x: AShare, y: AShare, fn: Product = torch.mul, shift: int = FRAC_BITS) -> Protocol:
    """Fixed-point fn(x, y): the product, then truncation, in two rounds together."""
    return (yield from trunc_sum(p, _cross(x, y, fn), shift))


def square(p: Party, x: AShare, shift: int = FRAC_BITS) -> Protocol:
    return (yield from trunc_sum(p, x.a * x.a + 2 * x.a * x.b, shift))


def linear(p: Party, x: AShare, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Protocol:
    """x (..., K) @ weight (K, N), both fixed point, + bias (N,) encoded with 2f fractional bits.

    Public weights: the product is local (no message); only the truncation talks."""
    z = x.map(lambda t: t @ weight)
    if bias is not None:
        z = z.add_public(p.index, bias)
    return (yield from trunc(p, z))


def band(p: Party, u: BShare, v: BShare, width: int = 64) -> Protocol:
    """Bitwise AND of XOR-shared int64 words whose bits above `width` are zero. One round; words of
    width <= 32 travel as 4 bytes."""
    shape = u.a.shape
    z = (u.a & v.a) ^ (u.a & v.b) ^ (u.b & v.a)
    z = z ^ p.prg(p.next, "zerob").ring(shape) ^ p.prg(p.prev, "zerob").ring(shape)
    if width < 64:
        z = z & ((1 << width) - 1)
    narrow = width <= 32
    got = yield Round(send={p.prev: [_narrow(z) if narrow else z]},
                      recv={p.next: _spec(shape, torch.int32 if narrow else torch.int64)})
    back = got[p.next][0]
    return BShare(z, back.to(torch.int64) & 0xFFFFFFFF if narrow else back)


def _narrow(z: torch.Tensor) -> torch.Tensor:
    """Words below 2^32 as int32 (the same low 32 bits)."""
    return torch.from_numpy(z.numpy().astype(np.uint32).view(np.int32))
