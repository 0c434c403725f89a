"""Comparison of shared values: the sign bit by a boolean adder, and what is built on it.

`msb(x)`: the three components x_0, x_1, x_2 are each known to two parties, so each is a
boolean-shared 64-bit number without any message. One layer of full adders (one AND round)
turns the three into two, s + c; the carry into bit 63 of s + c comes from a Brent-Kung tree
of (generate, propagate) pairs over bits 0..62 (one AND round for g, six for the tree, each
on half as many bits as the one before). Bits travel packed, so a comparison costs about
250 bits per party. `b2a` turns the shared bit into an arithmetic 0/1 (two multiplications),
so `ge0` is 10 rounds whatever the number of elements compared at once.

`select`, `maximum` (a tournament: log2(n) comparisons in sequence) build on it.
Knows nothing of models.
"""

from __future__ import annotations

import torch

from swarmlm.privacy.mpc.ops import band, mul
from swarmlm.privacy.mpc.runtime import Party, Protocol
from swarmlm.privacy.mpc.shares import AShare, BShare

_SHIFTS = torch.arange(64, dtype=torch.int64)


def bits(x: torch.Tensor) -> torch.Tensor:
    """int64 (...) -> bool (..., 64), least significant bit first."""
    return ((x.unsqueeze(-1) >> _SHIFTS) & 1).bool()


def _component(p: Party, x: AShare, j: int) -> BShare:
    """Component x_j of x as a boolean-shared number (nonzero only in component j)."""
    zero = torch.zeros(x.shape + (64,), dtype=torch.bool)
    a = bits(x.a) if j == p.index else zero
    b = bits(x.b) if j == p.next else zero
    return BShare(a, b)


def msb(p: Party, x: AShare) -> Protocol:
    """The sign bit of x, XOR-shared (bool, x's shape). Eight rounds."""
    A, B, C = (_component(p, x, j) for j in range(3))
    maj = (yield from band(p, A ^ C, B ^ C)) ^ C                     # carries of A + B + C
    s = A ^ B ^ C
    cy = maj.map(lambda t: torch.nn.functional.pad(t[..., :-1], (1, 0)))   # carries move up one bit
    g = yield from band(p, s, cy)
    prop = s ^ cy
    # (G, P) over bits 0..62, padded at bit 63 with (0, 1) so the tree is a power of two
    one = torch.zeros(x.shape + (64,), dtype=torch.bool)
    one[..., 63] = True
    G = g.map(lambda t: t.clone())
    G.a[..., 63] = False
    G.b[..., 63] = False
    P = prop.map(lambda t: t.clone())
    P.a[..., 63] = False
    P.b[..., 63] = False
    P = P.xor_public(p.index, one)
    while G.a.shape[-1] > 1:
        lo_g, hi_g = G.map(lambda t: t[..., 0::2]), G.map(lambda t: t[..., 1::2])
        lo_p, hi_p = P.map(lambda t: t[..., 0::2]), P.map(lambda t: t[..., 1::2])
        if G.a.shape[-1] > 2:
            both = yield from band(p, BShare(torch.cat([hi_p.a, hi_p.a], -1), torch.cat([hi_p.b, hi_p.b], -1)),
                                   BShare(torch.cat([lo_g.a, lo_p.a], -1), torch.cat([lo_g.b, lo_p.b], -1)))
            n = hi_p.a.shape[-1]
            t, P = both.map(lambda u: u[..., :n]), both.map(lambda u: u[..., n:])
        else:
            t = yield from band(p, hi_p, lo_g)
        G = hi_g ^ t
    top = (s ^ cy).map(lambda t: t[..., 63])
    return top ^ G.map(lambda t: t[..., 0])


def b2a(p: Party, bit: BShare) -> Protocol:
    """XOR-shared bit -> arithmetic 0/1 share. Two rounds."""
    def comp(j: int) -> AShare:
        zero = torch.zeros(bit.a.shape, dtype=torch.int64)
        return AShare(bit.a.long() if j == p.index else zero, bit.b.long() if j == p.next else zero)
    b0, b1, b2 = comp(0), comp(1), comp(2)
    t = b0 + b1 - (yield from mul(p, b0, b1)).scale(2)
    return t + b2 - (yield from mul(p, t, b2)).scale(2)


def ge0(p: Party, x: AShare) -> Protocol:
    """[x >= 0] as an arithmetic 0/1 share. Ten rounds."""
    neg = yield from b2a(p, (yield from msb(p, x)))
    return (-neg).add_public(p.index, 1)


def select(p: Party, bit: AShare, x: AShare, y: AShare) -> Protocol:
    """bit ? x : y for an arithmetic 0/1 bit. One round."""
    return y + (yield from mul(p, bit, x - y))


def maximum(p: Party, x: AShare, fill: int) -> Protocol:
    """Max over the last dim (keepdim). `fill` (encoded, public) pads odd lengths; it must lose."""
    while x.shape[-1] > 1:
        if x.shape[-1] % 2:
            x = x.map(lambda t: torch.nn.functional.pad(t, (0, 1), value=0)).add_public(
                p.index, _pad_last(x.shape, fill))
        lo, hi = x.map(lambda t: t[..., 0::2]), x.map(lambda t: t[..., 1::2])
        bigger = yield from ge0(p, lo - hi)
        x = yield from select(p, bigger, lo, hi)
    return x


def _pad_last(shape: torch.Size, fill: int) -> torch.Tensor:
    c = torch.zeros(shape[:-1] + (shape[-1] + 1,), dtype=torch.int64)
    c[..., -1] = fill
    return c
