"""Comparison of shared values: the sign bit by a boolean adder, and what is built on it.

`msb(x, width)`: reduction modulo 2^width is a ring homomorphism, so for |x| < 2^(width-1) the
sign of x is bit width-1 of x_0 + x_1 + x_2 mod 2^width. Party 0 knows S = x_0 + x_1, parties
1 and 2 know X = x_2: the generate / propagate bits of S + X, by blocks of up to 5 bits, are
XOR-shared by one three-party OT round (party 0 tabulates them for every value of X's block),
then a tree combines blocks pairwise (one AND round per level, packed bits), then `b2a` (bits.py)
turns the bit into an arithmetic 0/1 (one round, four ring elements): `ge0` is 4 rounds at width
16, 5 at 32..40, about 70 bytes an element at width 16. With `drop`, the low bits are dropped
first (a coarse threshold, fewer bits).

`select`, `maximum` (a tournament of groups of 8, all pairs at once, the wins ANDed as bits) build on it.
Knows nothing of models.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from swarmlm.privacy.mpc.bits import b2a, inject
from swarmlm.privacy.mpc.ops import band_bits, mul
from swarmlm.privacy.mpc.runtime import Party, Protocol, Round, parallel
from swarmlm.privacy.mpc.shares import AShare, BShare

SPLIT_LOW_FROM = 8192         # compared values from which the lowest block's generate bit gets its own OT (_share_gp)
WIDTH = 32                   # default: |x| < 2^31, i.e. below 32768 in value at 16 fractional bits


def _mask(width: int) -> int:
    return -1 if width >= 64 else (1 << width) - 1


def _wire(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Words below 2^bits as they travel: int8, int16 or int32 (the same low bits) if bits <= 8, 16 or 32,
    else int64."""
    if bits <= 8:
        return torch.from_numpy(words.numpy().astype(np.uint8).view(np.int8))
    if bits <= 16:
        return torch.from_numpy(words.numpy().astype(np.uint16).view(np.int16))
    return torch.from_numpy(words.numpy().astype(np.uint32).view(np.int32)) if bits <= 32 else words


def _ot_words(p: Party, table: torch.Tensor | None, choice: torch.Tensor | None, shape: tuple[int, ...],
              C: int, k: int, label: str) -> Protocol:
    """XOR shares of v = bits k*choice .. k*choice+k-1 of table (int64 words (...), or int32 / int16
    ones when C k = 32 / 16: C candidates of k bits, C k <= 64), where party 0 knows table and parties 1
    and 2 know choice (< C). One round; v comes as uint8 words of k <= 8 bits.

    v is shared as (v_0, v_1, v_2): v_1 and v_0 from party 0's PRGs with parties 1 and 2, and
    v_2 = v ^ v_0 ^ v_1 reaches parties 1 and 2 by a three-party oblivious transfer (ABY3's, with
    C messages): party 0 sends all C candidates under a pad it shares with the other receiver,
    who knows the choice too and sends the pad's bits of the right one. What each receives is
    uniform: the other candidates stay under the pad, and v_2 under the component it lacks."""
    nbits = C * k
    kmask = (1 << k) - 1
    wmask = -1 if nbits >= 64 else (1 << nbits) - 1
    wdtype = torch.int8 if nbits <= 8 else torch.int16 if nbits <= 16 else torch.int32 if nbits <= 32 else torch.int64
    if p.index == 0:
        g1, g2 = p.prg(1, label), p.prg(2, label)
        v1, pw = g1.small(shape, k), _pad_words(g1, shape, nbits)     # pad of party 2's transfer (party 1 helps)
        v0, pv = g2.small(shape, k), _pad_words(g2, shape, nbits)     # pad of party 1's transfer (party 2 helps)
        if nbits in (16, 32):                                      # narrow words all the way (less memory traffic)
            masked = table.numpy() ^ _replicated(k, nbits)[(v0 ^ v1).numpy()]
            yield Round(send={1: [torch.from_numpy(masked ^ pv.view(masked.dtype))],
                              2: [torch.from_numpy(masked ^ pw.view(masked.dtype))]})
            return BShare(v0, v1)
        rep = sum(1 << (k * c) for c in range(C))
        rep = rep - (1 << 64) if rep >= 1 << 63 else rep
        masked = table ^ ((v0 ^ v1).long() * rep)
        pv, pw = (torch.from_numpy(w.view(np.int64) if w.dtype == np.uint64 else w.astype(np.int64)) for w in (pv, pw))
        yield Round(send={1: [_wire((masked ^ pv) & wmask, nbits)], 2: [_wire((masked ^ pw) & wmask, nbits)]})
        return BShare(v0, v1)
    me, other = p.index, 3 - p.index
    g0 = p.prg(0, label)
    mine, pads = g0.small(shape, k), _pad_words(g0, shape, nbits)   # v_1 (party 1) or v_0 (party 2); the other's pad
    shift = choice.numpy().astype(np.uint8) * np.uint8(k)            # choice < C <= 32, k <= 2: below 64
    helper = ((pads >> shift) & kmask).astype(np.uint8)             # k <= 8 bits each
    hbits = np.empty(helper.shape + (k,), dtype=np.uint8)
    for j in range(k):
        np.bitwise_and(helper >> j, 1, out=hbits[..., j])
    got = yield Round(send={other: [torch.from_numpy(hbits.view(np.bool_))]},
                      recv={0: [(shape, wdtype)], other: [(shape + (k,), torch.bool)]})
    word = got[0][0].numpy().view(pads.dtype)
    bits = got[other][0].numpy().view(np.uint8)
    back = bits[..., 0].copy()
    for j in range(1, k):
        back |= bits[..., j] << j
    back ^= ((word >> shift) & kmask).astype(np.uint8)
    v2 = torch.from_numpy(back)
    return BShare(mine, v2) if me == 1 else BShare(v2, mine)


def _pad_words(g, shape: tuple[int, ...], nbits: int) -> np.ndarray:
    """An OT's pad, as the sender and the receivers draw it: unsigned numpy words as wide as the
    table's words (8, 16, 32 or 64 bits), the bits above nbits cleared."""
    width = 8 if nbits <= 8 else 16 if nbits <= 16 else 32 if nbits <= 32 else 64
    words = g.unsigned(shape, width)
    if nbits < width:
        words &= (1 << nbits) - 1
    return words


@functools.lru_cache(maxsize=8)
def _replicated(k: int, nbits: int) -> np.ndarray:
    """(2^k,) int16 or int32 (nbits 16 or 32), numpy, read-only: a k-bit value repeated nbits/k times."""
    words = [sum(v << (k * c) for c in range(nbits // k)) for v in range(1 << k)]
    out = np.array(words, dtype=np.uint16 if nbits == 16 else np.uint32).view(np.int16 if nbits == 16 else np.int32)
    out.flags.writeable = False
    return out


def _block(width: int, levels: int | None = None) -> int:
    """Bits per block of the carry chain (positions 0..width-1, the top one folded into the last
    block): the fewest tree levels with blocks of at most 5 bits (32 candidates of 2 bits, one
    64-bit word), then the smallest such block; or, given `levels` (a comparison running beside a
    wider one, which sets the rounds), the fewest bytes of tables within that many levels."""
    depth = lambda b: math.ceil(math.log2(max(1, math.ceil(width / b))))   # noqa: E731
    if levels is None or levels < min(depth(b) for b in range(1, 6)):
        best = min(depth(b) for b in range(1, 6))
        return min(b for b in range(1, 6) if depth(b) == best)
    word = lambda b: 2 if b <= 3 else 4 if b == 4 else 8                     # noqa: E731  (_wire's words)
    return min((b for b in range(1, 6) if depth(b) <= levels), key=lambda b: (math.ceil(width / b) * word(b), depth(b)))


def table_cost(width: int, levels: int | None = None) -> int:
    """Bytes of the generate / propagate tables party 0 sends each receiver per compared value."""
    b = _block(width, levels)
    return math.ceil(width / b) * (2 if b <= 3 else 4 if b == 4 else 8)


def tree_levels(width: int) -> int:
    """The carry tree's levels of a comparison of `width` bits (msb: that many rounds after the first)."""
    return math.ceil(math.log2(max(1, math.ceil(width / _block(width)))))


@functools.lru_cache(maxsize=32)
def _gp_words(b: int, top: int, dtype: torch.dtype = torch.int64, gen_only: bool = False) -> torch.Tensor:
    """(2^b,) int64 (or int32 / int16 with the same low bits, for words of 32 / 16 bits): for a block value s of S, the
    2^b candidates (c = X's block value) of 2 bits:
    generate (s + c carries out of the block's chain bits) and propagate ((s ^ c) all ones there).
    With `top` < b, bit `top` is x's top bit: the chain has bits 0..top-1 and the generate bit
    also XORs in bit `top` of s ^ c (the msb is then the carry into the top XOR that); bits
    above `top` are padding. `gen_only`: the generate bit alone, candidate c at bit c (the lowest
    block, whose propagate nothing reads)."""
    chain = b if top >= b else top
    full = (1 << chain) - 1
    s, c = torch.arange(1 << b)[:, None], torch.arange(1 << b)[None, :]
    gen = ((s & full) + (c & full)) > full
    prop = ((s ^ c) & full) == full
    if top < b:
        gen = gen ^ (((s ^ c) >> top) & 1).bool()
    if gen_only:
        words = (gen.long() << torch.arange(1 << b)).sum(-1)                  # candidate c at bit c
    else:
        bits = gen.long() | (prop.long() << 1)                              # (2^b, 2^b)
        words = (bits << (2 * torch.arange(1 << b))).sum(-1)                  # candidate c at bits 2c, 2c+1
    if dtype == torch.int32:
        return torch.from_numpy(words.numpy().astype(np.uint32).view(np.int32))
    if dtype == torch.int16:
        return torch.from_numpy(words.numpy().astype(np.uint16).view(np.int16))
    return words


def _share_gp(p: Party, x: AShare, width: int, drop: int = 0, levels: int | None = None) -> Protocol:
    """XOR shares of the (generate, propagate) bits of the blocks of S + X over bits 0..width-1
    (two int64 words of bits, (..., nb) each), where S = x_0 + x_1 is known to party 0 and X = x_2
    to parties 1 and 2 (each shifted right by `drop`, see msb). One round.

    A block of b bits is one OT with 2^b candidates (_ot_words): party 0 tabulates, for every
    value c of X's block, whether its block of S plus c carries out (generate) and whether it is
    all ones when XORed with c (propagate); the receivers pick X's value. The last block holds
    the top bit, whose S ^ X is XORed into its generate bit, so the carry tree's result is the
    msb itself."""
    b = _block(width, levels)
    nb = math.ceil(width / b)
    top = (width - 1) - (nb - 1) * b                                         # the top bit's place in the last block
    last = (1 << (top + 1)) - 1                                              # the last block's bits
    # the lowest block's propagate is never read (nothing carries into it): its OT carries the
    # generate bit alone (half the table) for a single block (which is also the top one), or, in a
    # second call, for large inputs (each call costs the parties' compute more than its bytes save
    # on small ones)
    alone = 1 if nb == 1 or x.a.numel() >= SPLIT_LOW_FROM else 0
    dtype0 = torch.int32 if b == 5 else torch.int16 if b == 4 else torch.int64   # 32 or 16 candidates of 1 bit
    dtype = torch.int32 if b == 4 else torch.int16 if b == 3 else torch.int64    # 16 or 8 candidates of 2 bits
    if p.index == 0:
        blocks = _blocks((x.a + x.b) >> drop, b, nb, last).numpy()
        parts = []
        if alone:
            table = _gp_words(b, top if nb == 1 else b, dtype0, gen_only=True).numpy()[blocks[..., :1]]
            parts.append(_ot_words(p, torch.from_numpy(table), None, tuple(x.shape) + (1,), 1 << b, 1, "g0"))
        if nb > alone:
            words = np.empty(blocks[..., alone:].shape, dtype=_gp_words(b, b, dtype).numpy().dtype)
            words[..., :-1] = _gp_words(b, b, dtype).numpy()[blocks[..., alone:-1]]
            words[..., -1] = _gp_words(b, top, dtype).numpy()[blocks[..., -1]]
            parts.append(_ot_words(p, torch.from_numpy(words), None, tuple(x.shape) + (nb - alone,), 1 << b, 2, "gp"))
    else:
        blocks = _blocks((x.b if p.index == 1 else x.a) >> drop, b, nb, last)
        parts = []
        if alone:
            parts.append(_ot_words(p, None, blocks[..., :1], tuple(x.shape) + (1,), 1 << b, 1, "g0"))
        if nb > alone:
            parts.append(_ot_words(p, None, blocks[..., alone:], tuple(x.shape) + (nb - alone,), 1 << b, 2, "gp"))
    got = yield from parallel(*parts)
    if len(got) == 1:
        return got[0]
    return BShare(torch.cat([g.a for g in got], -1), torch.cat([g.b for g in got], -1))


def _blocks(v: torch.Tensor, b: int, nb: int, last: int) -> torch.Tensor:
    """The nb blocks of b bits of v (the last one masked by `last`) as uint8, (..., nb): party 0's table rows,
    the receivers' choices."""
    words = v.numpy()
    out = np.empty(words.shape + (nb,), dtype=np.uint8)
    for j in range(nb):
        np.bitwise_and(words >> (j * b), (1 << b) - 1, out=out[..., j], casting="unsafe")
    out[..., -1] &= last
    return torch.from_numpy(out)


def msb(p: Party, x: AShare, width: int = WIDTH, drop: int = 0, levels: int | None = None) -> Protocol:
    """Bit width-1 of x mod 2^width, XOR-shared in bit 0 of int64 words (x's shape).

    With `drop` = k, of (S >> k) + (X >> k) instead, which is floor(x / 2^k) or one less (the
    carry out of the dropped bits is lost): the sign of x for |x| < 2^(width-1+k), except that
    x in [0, 2^k) may read as negative. A comparison that needs only a coarse threshold
    (a clamp, a max to within a fraction) runs on fewer bits, so in fewer rounds and bytes.

    x = S + X with S = x_0 + x_1 (party 0) and X = x_2 (parties 1 and 2): the generate and
    propagate bits of blocks of up to 5 bits (the last block's generate XORed with the top
    bit of S ^ X) are shared in one round (_share_gp), then a tree over the blocks (pairs
    combined per round, the count halving) ends with the msb itself: 1 + ceil(log2(blocks))
    rounds, 3 for width 16 (4 blocks of 4), 4 for width 32 or 40 (8 blocks)."""
    gp = yield from _share_gp(p, x, width, drop, levels)
    G, P = gp.map(lambda t: (t & 1).bool()), gp.map(lambda t: ((t >> 1) & 1).bool())
    while G.a.shape[-1] > 1:
        n = G.a.shape[-1]
        even = n - n % 2
        lo = lambda t: t[..., 0:even:2]                        # noqa: E731
        hi = lambda t: t[..., 1:even:2]                        # noqa: E731
        Phi = P.map(hi)
        # G of every pair, P of all but the lowest (nothing carries into it: its P is never read)
        both = yield from band_bits(p, BShare(torch.cat([Phi.a, Phi.a[..., 1:]], -1), torch.cat([Phi.b, Phi.b[..., 1:]], -1)),
                                    BShare(torch.cat([G.map(lo).a, P.map(lo).a[..., 1:]], -1),
                                           torch.cat([G.map(lo).b, P.map(lo).b[..., 1:]], -1)))
        half = even // 2
        newG = G.map(hi) ^ both.map(lambda t: t[..., :half])
        newP = both.map(lambda t: t[..., half - 1:])          # its first (the lowest pair's) is a placeholder
        if n % 2:                                               # the top block passes through
            newG = BShare(torch.cat([newG.a, G.a[..., -1:]], -1), torch.cat([newG.b, G.b[..., -1:]], -1))
            newP = BShare(torch.cat([newP.a, P.a[..., -1:]], -1), torch.cat([newP.b, P.b[..., -1:]], -1))
        G, P = newG, newP
    return G.map(lambda t: t[..., 0].to(torch.int64))


def ge0(p: Party, x: AShare, width: int = WIDTH, drop: int = 0, levels: int | None = None) -> Protocol:
    """[x >= 0] as an arithmetic 0/1 share, for |x| < 2^(width-1+drop); with `drop`, x in [0, 2^drop)
    may read as negative (msb). 2 + ceil(log2(width-1)) rounds: 7 for width 32, 6 for 17."""
    neg = yield from b2a(p, (yield from msb(p, x, width, drop, levels)))
    return (-neg).add_public(p.index, 1)


def select(p: Party, bit: AShare, x: AShare, y: AShare) -> Protocol:
    """bit ? x : y for an arithmetic 0/1 bit. One round."""
    return y + (yield from mul(p, bit, x - y))


def coarse(p: Party, x: AShare, drop: int) -> AShare:
    """x as msb reads it, each value rounded down by `drop` bits once: party 0 holds S >> drop
    (S = x_0 + x_1), parties 1 and 2 hold x_2 >> drop (in the places msb reads), the rest zero.
    Only for msb / ge0; differences between such values are exact (no carry lost between them),
    a public constant goes to party 0's first component. Local."""
    if drop == 0:
        return x
    zero = torch.zeros_like(x.a)
    if p.index == 0:
        return AShare((x.a + x.b) >> drop, zero)
    if p.index == 1:
        return AShare(zero, x.b >> drop)
    return AShare(x.a >> drop, zero)


@functools.lru_cache(maxsize=64)
def _pair_tables(g: int) -> tuple[list[tuple[int, int]], torch.Tensor, torch.Tensor]:
    """Unordered pairs (i < j), and for each i the g-1 pairs it is in, and whether it is their j
    (computed once per g: a decoding step's all-pairs tables are O(g^3) to build; read-only)."""
    pairs = [(i, j) for i in range(g) for j in range(i + 1, g)]
    idx = torch.tensor([[k for k, (a, b) in enumerate(pairs) if i in (a, b)] for i in range(g)], dtype=torch.long)
    second = torch.tensor([[int(b == i) for (a, b) in pairs if i in (a, b)] for i in range(g)], dtype=torch.int64)
    return pairs, idx.view(g, max(g - 1, 0)), second.view(g, max(g - 1, 0))


def _group_max(p: Party, groups: AShare, margin: int | None, width: int, drop: int,
               originals: AShare | None = None) -> Protocol:
    """Max over the last dim of `groups` (..., g) by comparing all pairs at once; with `margin`
    (encoded), also [x_i >= max - margin] for each i, from the same comparison round: for the
    group's own values (ordered pairs), or, given `originals` (..., 1, n) (the row before the
    earlier levels, groups then being (..., 1, g)), for those: x_i >= m_j - margin for all j."""
    g = groups.shape[-1]
    pairs, idx, second = _pair_tables(g)
    li = [i for i, _ in pairs]
    lj = [j for _, j in pairs]
    own_near = margin is not None and originals is None
    if own_near:                                                        # ordered pairs (i, j != i)
        others = torch.tensor([[j for j in range(g) if j != i] for i in range(g)], dtype=torch.long)
        li += [i for i in range(g) for _ in range(g - 1)]
        lj += others.reshape(-1).tolist()
    li_t, lj_t = torch.tensor(li, dtype=torch.long), torch.tensor(lj, dtype=torch.long)
    offset = torch.zeros(len(li), dtype=torch.int64)
    offset[len(pairs):] = (margin or 0) >> drop
    # with `drop`, every value is first rounded down once (coarse), so all pairs compare the same
    # rounded values exactly and the wins stay a total order (one winner per group)
    cg = coarse(p, groups, drop)
    diffs = cg.map(lambda t: t[..., li_t] - t[..., lj_t])                              # (..., P [+ g(g-1)])
    if p.index == 0:
        diffs = AShare(diffs.a + offset, diffs.b)
    n = 0
    if originals is not None and margin is not None:                  # x_i - m_j + margin, (..., 1, n * g)
        n = originals.shape[-1]
        co = coarse(p, originals, drop)
        vs = AShare((co.a.unsqueeze(-1) - cg.a.unsqueeze(-2)).flatten(-2), (co.b.unsqueeze(-1) - cg.b.unsqueeze(-2)).flatten(-2))
        if p.index == 0:
            vs = AShare(vs.a + (margin >> drop), vs.b)
        diffs = AShare(torch.cat([diffs.a, vs.a], -1), torch.cat([diffs.b, vs.b], -1))
    neg = (yield from msb(p, diffs, width)).map(lambda t: t.bool())                    # [x_i - x_j < 0]
    # wins (..., g, g-1), boolean: [x_i >= x_j] where i < j, else [x_i > x_j] = [x_j - x_i < 0]
    # (ties: lower index); the winner is the AND of its wins, the near bits the AND of theirs
    first = (1 - second).bool()
    P = len(li)
    rows = neg.map(lambda t: t[..., idx]).xor_public(p.index, first)
    if own_near:
        near = neg.map(lambda t: t[..., len(pairs):P].reshape(*t.shape[:-1], g, g - 1)).xor_public(
            p.index, torch.ones((g, g - 1), dtype=torch.bool))
        rows = BShare(torch.cat([rows.a, near.a], -2), torch.cat([rows.b, near.b], -2))   # (..., 2g, g-1)
    if n:
        near = neg.map(lambda t: t[..., P:].reshape(*t.shape[:-1], n, g)).xor_public(
            p.index, torch.ones((n, g), dtype=torch.bool))
        alls, close = yield from parallel(_all(p, rows), _all(p, near))               # (..., 1, g), (..., 1, n)
        alls = BShare(torch.cat([alls.a, close.a], -1), torch.cat([alls.b, close.b], -1))
    else:
        alls = yield from _all(p, rows)                                                 # (..., g or 2g)
    bits = alls.map(lambda t: t.to(torch.int64))
    win = bits.map(lambda t: t[..., :g])
    if margin is not None:                                  # the winner's value, and the near bits as 0/1
        picked, near = yield from parallel(inject(p, win, groups), b2a(p, bits.map(lambda t: t[..., g:])))
    else:
        picked, near = (yield from inject(p, win, groups)), None
    return picked.map(lambda t: t.sum(-1)), near


def _all(p: Party, x: BShare) -> Protocol:
    """AND over the last dim of XOR-shared bool tensors (..., L) -> (...), ceil(log2(L)) rounds of packed bits."""
    while x.a.shape[-1] > 1:
        half = x.a.shape[-1] // 2
        both = yield from band_bits(p, x.map(lambda t: t[..., :half]), x.map(lambda t: t[..., half:2 * half]))
        x = BShare(torch.cat([both.a, x.a[..., 2 * half:]], -1), torch.cat([both.b, x.b[..., 2 * half:]], -1))
    return x.map(lambda t: t[..., 0])


def maximum(p: Party, x: AShare, fill: int, group: int = 8, margin: int | None = None,
            width: int = WIDTH, drop: int = 0) -> Protocol:
    """Max over the last dim (keepdim). `fill` (encoded, public) pads lengths; it must lose.
    `width` and `drop` are the comparisons' (ge0): with `drop`, the max may be any value within
    2^(drop+1) (encoded) of it (each value reads as floor(x / 2^drop) or one less), and `near`
    exact to within 2^drop.

    A tournament of groups: within each group of `group` values every pair is compared at once
    (one comparison depth), the winner's indicator is the AND of its g-1 wins (XOR-shared bits;
    ties go to the lower index, so there is exactly one), and the max is sum(indicator * value).

    With `margin`, also returns [x_i >= max - margin] (..., n): the last level compares each x_i
    with every candidate left (all of them, in a single level) in the round of its pairs, and
    ANDs the bits in the rounds of the wins.
    Rounds per level: msb (3 at width 16) + ceil(log2(g-1)) (AND of the wins) + 1 (the winner's
    value by `inject`): 13 for 32 keys in groups of 8."""
    near = None
    row = x
    level = 0
    while x.shape[-1] > 1:
        n = x.shape[-1]
        g = min(group, n)
        if n % g:
            extra = g - n % g
            x = x.map(lambda t: torch.nn.functional.pad(t, (0, extra), value=0)).add_public(
                p.index, _pad_last(x.shape, fill, extra))
        groups = x.map(lambda t: t.reshape(*t.shape[:-1], -1, g))                  # (..., n/g, g)
        last = g == n and margin is not None
        originals = row.map(lambda t: t.unsqueeze(-2)) if last and level else None
        top, near = yield from _group_max(p, groups, margin if last else None, width, drop, originals)
        x = top
        level += 1
        if last:
            near = near.map(lambda t: t.squeeze(-2))                                 # (..., n)
    return (x, near) if margin is not None else x


def _pad_last(shape: torch.Size, fill: int, extra: int = 1) -> torch.Tensor:
    c = torch.zeros(shape[:-1] + (shape[-1] + extra,), dtype=torch.int64)
    c[..., -extra:] = fill
    return c
