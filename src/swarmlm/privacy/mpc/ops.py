"""The interactive arithmetic of replicated shares: multiplication, truncation, AND.

Every function here is a protocol (a generator; see runtime.py) run by each party on its own
shares, `x = yield from mul(party, a, b)`.

- Multiplication: party i computes z_i = a_i b_i + a_i b_{i+1} + a_{i+1} b_i (a 3-out-of-3
  sharing of ab), re-randomizes it with a zero share from the pairwise PRGs and sends it to
  party i-1: one round, one ring element per party per product (ABY3 / Araki et al.).
- Truncation (dividing a fixed-point value by 2^f), one round: the mask r = r_0 + r_1 + r_2 is
  replicated like a share, each component uniform in [0, 2^61) from the PRG of the two parties
  holding it, so no party knows all of r. Parties 0 and 2 receive the masked components they
  lack and open c = z + r (no wrap-around: |z| < 2^61); the result is (c >> f) in component 0
  minus (r_j >> f) in each component j, which is floor(z / 2^f) plus 0..3 units, minus one
  public unit: an error of -1..+2 units in the last place, never a wrap-around error. Each
  opener misses one component of r, so c hides z statistically up to 2^-(61 - log2|z|): for
  values below 2^10 in magnitude (products carry 2f = 32 fractional bits) that is 19 bits.
  The opening reads only c >> f, so the masked words of a call of CUT_FROM words or more travel
  without their 16-bit halves below the shift (6 of 8 bytes for shifts of 16 to 31; smaller calls,
  a decoding step's, keep whole words: there the passes cost more than the bytes save); both
  openers add the three words so cut, plus the mean of what was cut, and agree on c to the bit:
  one unit more either way (-2..+3 in all). Leaving bytes out only sends less: the hiding is the same.
  A product's 3-out-of-3 components are truncated the same way (fused: multiplication and
  truncation in one round, four words per element); a replicated value needs two.
- AND of XOR-shared bits: the same as multiplication over GF(2), one round.
Knows nothing of models.
"""

from __future__ import annotations

from typing import Callable

import torch

from swarmlm.privacy.mpc.ring import FRAC_BITS, encode
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


def reshare_pair(p: Party, z: torch.Tensor) -> Protocol:
    """3-out-of-3 component z_i of z, party 0's zero (bits.bit_times' sums) -> replicated shares of z.
    One round, two ring elements an element (reshare: three).

    Components 0 and 1 are draws of the PRGs of parties 0 and 2 and of parties 0 and 1 (party 0 holds
    both: its part is zero); component 2 = z - c0 - c1, which parties 1 and 2 both take as the sum of
    what each sends the other: its part less the draw it knows (z_1 - c1 from party 1, z_2 - c0 from
    party 2), each under the draw its receiver lacks."""
    shape = z.shape
    if p.index == 0:
        c1, c0 = p.prg(1, "pair").ring(shape), p.prg(2, "pair").ring(shape)
        yield Round()
        return AShare(c0, c1)
    other = 3 - p.index
    mine = p.prg(0, "pair").ring(shape)                        # c1 at party 1, c0 at party 2
    part = z - mine
    got = yield Round(send={other: [part]}, recv={other: _spec(shape)})
    c2 = part.add_(got[other][0])
    return AShare(mine, c2) if p.index == 1 else AShare(c2, mine)


def mul(p: Party, x: AShare, y: AShare, fn: Product = torch.mul) -> Protocol:
    """fn(x, y) without truncation (use when one side is an integer, e.g. a bit)."""
    return (yield from reshare(p, _cross(x, y, fn)))


TRUNC_MASK_BITS = 61         # each component of a truncation mask is uniform in [0, 2^61)


def _trunc_masks(p: Party, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """This party's two components (r_i, r_{i+1}) of a truncation mask r = r_0 + r_1 + r_2 < 3 * 2^61,
    component j drawn from the PRG of the two parties holding it (j and j-1)."""
    return (p.prg(p.prev, "trunc1").below(shape, TRUNC_MASK_BITS),
            p.prg(p.next, "trunc1").below(shape, TRUNC_MASK_BITS))


def _open_truncated(p: Party, c: torch.Tensor | None, r: tuple[torch.Tensor, torch.Tensor],
                    shift: int | torch.Tensor) -> AShare:
    """Replicated floor(z / 2^shift) from c = z + r (known to parties 0 and 2 only) and r's components:
    (c >> s) - sum_j (r_j >> s) - 1, which is floor(z / 2^s) + {-1, 0, 1, 2} (one more either way
    where c came from the top bytes of the messages: top_bytes). Works in place on r and c (fresh
    tensors of the caller's)."""
    a, b = r[0].bitwise_right_shift_(shift).neg_(), r[1].bitwise_right_shift_(shift).neg_()
    if p.index in (0, 2):
        opened = c.bitwise_right_shift_(shift).sub_(1)
        (a if p.index == 0 else b).add_(opened)
    return AShare(a, b)


CUT_FROM = 2048              # words a truncation call cuts from (below, the passes cost more than the bytes save)


def _kept_bytes(shift: int | torch.Tensor, n: int) -> int:
    """The top bytes of a truncation's n masked words that travel: the opener needs only c >> shift, so
    the 16-bit halves below the (smallest) shift stay home: 6 bytes of 8 for shifts of 16 to 31, 4 from
    32 (whole int16 columns of the words), in calls of at least CUT_FROM words."""
    low = int(shift.min()) if isinstance(shift, torch.Tensor) else int(shift)
    return 8 - 2 * min(max(low, 0) // 16, 2) if n >= CUT_FROM else 8


def words_from_top(t: torch.Tensor, keep: int) -> torch.Tensor:
    """top_bytes' int16 columns (..., keep / 2) -> int64 words with those bytes on top and zero below."""
    out = torch.zeros(tuple(t.shape[:-1]) + (4,), dtype=torch.int16)
    out[..., 4 - keep // 2:] = t
    return out.view(torch.int64).view(tuple(t.shape[:-1]))


def top_bytes(m: torch.Tensor, keep: int) -> torch.Tensor:
    """int64 words (...) -> their top `keep` bytes as int16 columns (..., keep / 2) (the words for 8): a
    view of m, which the message's encoding copies before the protocol resumes."""
    if keep == 8:
        return m
    return m.contiguous().view(torch.int16).view(tuple(m.shape) + (4,))[..., 4 - keep // 2:]


def _opened(own: list[torch.Tensor], received: list[torch.Tensor], keep: int) -> torch.Tensor:
    """c = the sum of the three masked words: this opener's own (fresh tensors, worked on in place) and
    the ones received as top_bytes. Every word counts with its low 8 - keep bytes zeroed (the two
    openers must compute the same c), plus the three cut parts' mean (1.5 units of the lowest byte
    kept), so c is within 1.5 such units of the exact sum."""
    if keep == 8:
        return sum(own[1:] + received, own[0])
    mask = -1 << (64 - 8 * keep)
    c = own[0].bitwise_and_(mask)
    for w in own[1:]:
        c.add_(w.bitwise_and_(mask))
    buf = torch.zeros(tuple(c.shape) + (4,), dtype=torch.int16)       # the columns below stay zero
    words = buf.view(torch.int64).view(c.shape)
    for t in received:
        buf[..., 4 - keep // 2:] = t
        c.add_(words)
    return c.add_(3 << (63 - 8 * keep))


def word_spec(shape, keep: int):
    return _spec(shape) if keep == 8 else _spec(tuple(shape) + (keep // 2,), torch.int16)


def trunc_sum(p: Party, z: torch.Tensor, shift: int | torch.Tensor = FRAC_BITS) -> Protocol:
    """3-out-of-3 component z_i of z -> replicated shares of floor(z / 2^shift) + {-2, .., 3}. One round.

    z_i is re-randomized by a zero share and masked by r_i; parties 0 and 2 each receive the two
    masked components they lack and open c = z + r, which hides z behind the one component of r
    they do not know (uniform in [0, 2^61)). Four words per element, of the top bytes the opening
    reads (_kept_bytes: 6 of 8 for shifts of 16 to 31; _opened: at most one unit more either way)."""
    shape = z.shape
    m = p.prg(p.next, "zero").ring(shape)                     # fresh: worked on in place
    m.sub_(p.prg(p.prev, "zero").ring(shape)).add_(z)         # z_i re-randomized by a zero share
    r = _trunc_masks(p, shape)
    m.add_(r[0])
    keep = _kept_bytes(shift, z.numel())
    spec = word_spec(shape, keep)
    if p.index == 1:
        top = top_bytes(m, keep)
        yield Round(send={0: [top], 2: [top]})
        return _open_truncated(p, None, r, shift)
    other = 2 - p.index                                       # 0 <-> 2
    got = yield Round(send={other: [top_bytes(m, keep)]}, recv={1: spec, other: spec})
    c = _opened([m], [got[1][0], got[other][0]], keep)
    return _open_truncated(p, c, r, shift)


def trunc(p: Party, x: AShare, shift: int | torch.Tensor = FRAC_BITS) -> Protocol:
    """Replicated x -> replicated floor(x / 2^shift) + {-2, .., 3}. One round, two words per element:
    party 1 sends x_2 + r_2 to party 0, party 0 sends x_1 + r_1 to party 2 (each the component its
    receiver lacks), their top bytes as trunc_sum's. `shift` may be a tensor broadcasting against x.
    Party 1 reads only its second component (x_2; its first may be a placeholder of the same shape)."""
    shape = x.shape
    r = _trunc_masks(p, shape)
    keep = _kept_bytes(shift, x.a.numel())
    spec = word_spec(shape, keep)
    if p.index == 0:                                          # holds components 0 and 1
        mine, sent = x.a + r[0], x.b + r[1]
        got = yield Round(send={2: [top_bytes(sent, keep)]}, recv={1: spec})
        c = _opened([mine, sent], [got[1][0]], keep)
    elif p.index == 1:
        yield Round(send={0: [top_bytes(x.b + r[1], keep)]})
        c = None
    else:                                                     # holds components 2 and 0
        got = yield Round(recv={0: spec})
        c = _opened([x.a + r[0], x.b + r[1]], [got[0][0]], keep)
    return _open_truncated(p, c, r, shift)


def mul_trunc(p: Party, x: AShare, y: AShare, fn: Product = torch.mul, shift: int = FRAC_BITS) -> Protocol:
    """Fixed-point fn(x, y): the product and its truncation in one round."""
    return (yield from trunc_sum(p, _cross(x, y, fn), shift))


def square(p: Party, x: AShare, shift: int = FRAC_BITS) -> Protocol:
    return (yield from trunc_sum(p, x.a * x.a + 2 * x.a * x.b, shift))


def linear(p: Party, x: AShare, weight: torch.Tensor, bias: torch.Tensor | None = None,
           shift: int | torch.Tensor = FRAC_BITS) -> Protocol:
    """x (..., K) @ weight (K, N), both fixed point, + bias (N,) encoded with 2f fractional bits;
    `shift` (per output column, if a tensor) leaves 2f - shift fractional bits.

    Public weights: the product is local (no message); only the truncation talks (one round), in
    which party 1 only sends its second component: it computes that product alone."""
    if p.index == 1:
        zb = x.b @ weight
        z = AShare(zb, zb)                                    # its first component is never read (trunc)
    else:
        z = x.map(lambda t: t @ weight)
    if bias is not None:
        z = z.add_public(p.index, bias)
    return (yield from trunc(p, z, shift))


def band_bits(p: Party, u: BShare, v: BShare) -> Protocol:
    """AND of XOR-shared bool tensors (one bit per element, packed 8 to a byte on the wire). One round."""
    shape = u.a.shape
    z = (u.a & v.a) ^ (u.a & v.b) ^ (u.b & v.a)
    z = z ^ p.prg(p.next, "zerobits").bits(shape) ^ p.prg(p.prev, "zerobits").bits(shape)
    got = yield Round(send={p.prev: [z]}, recv={p.next: _spec(shape, torch.bool)})
    return BShare(z, got[p.next][0])


# ---- small share helpers of the nonlinear functions (funcs.py, inverse.py) --------------------

def public_share(p: Party, shape, value: float, frac: int = FRAC_BITS) -> AShare:
    """A public constant as a share (in component 0)."""
    zero = torch.zeros(shape, dtype=torch.int64)
    return AShare(zero, zero.clone()).add_public(p.index, encode(value, frac))


def stack_shares(shares: list[AShare]) -> AShare:
    return AShare(torch.stack([s.a for s in shares]), torch.stack([s.b for s in shares]))


def unstack_shares(s: AShare, n: int) -> list[AShare]:
    return [s.map(lambda t, i=i: t[i]) for i in range(n)]


def cross_sum(pairs: list[tuple[AShare, AShare]]) -> torch.Tensor:
    """This party's 3-out-of-3 component of sum_k x_k y_k."""
    return sum(x.a * y.a + x.a * y.b + x.b * y.a for x, y in pairs)
