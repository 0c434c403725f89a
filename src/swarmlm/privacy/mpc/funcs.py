"""Nonlinear functions on shares: exp, reciprocal, rsqrt, GELU, SiLU, softmax, the norms.

How each is approximated (all inputs and outputs fixed point with f fractional bits):
- `inverse_power` (1/v and 1/sqrt(v)): see inverse.py.
- `exp_neg` (e^x for x <= 0, softmax after the max is subtracted): x is clamped at -16 (the
  bit comes with the max, or one coarse comparison), read as x/8 with 3 more fractional bits
  (no truncation), a Chebyshev series of degree 12 gives e^(x/2) on [-8, 0], and one
  squaring gives e^x. 6 rounds after the clamp bit.
- `gelu` and `silu` in PUMA's manner: f(x) = x/2 + E(x) where E(x) = x (sigmoid-like(x) - 1/2)
  is even and smooth, so it is a Chebyshev series in t = 2(x/B)^2 - 1 (B a power of two so
  x/B is free), with t clamped to 1 outside [-B, B] (so nothing overflows); outside, f is relu,
  whose correction joins the series' last round: bits times x straight into that round's
  3-out-of-3 sum (bits.bit_times; the clamp's inside (w - 1) comes the same way, reshared: ops.reshare_pair).
  The clamps are
  coarse comparisons (GELU's to 1/16, for |x| < 2040, SiLU's to 1/2 on 12 bits, for |x| < 1020: its
  lower threshold is -B - 1/2, so relu starts beyond |x| = B on both sides and the series, fitted to
  B + 1/2, covers what the coarse bits may leave inside). x^2 is truncated before the clamp (in the comparisons' rounds): for |x| < 32 its mask hides
  it as well as any other truncation (19 bits), larger outliers less so. A series of degree
  <= 12 is A(t) + T4 B(t) + T8 C(t) (_fold): T2; T3, T4; T8 and B, C truncated; one sum of
  products: 4 rounds, 5 products, 24 words an element (a truncation's words: 6 bytes, ops.py); or
  (`horner`, the gated MLP's SiLU, which has the round to spare) (A - C) + T4 (B + 2 T4 C): C
  truncated, then the inner sum, then the outer: 5 rounds, 22 words. GELU: B = 4, degree 8 (error 1.6e-4); SiLU: B = 8, degree 12
  (error 2e-4 for |x| < 4, 4e-4 to 8.5; just inside the clamp, 8.25 < |x| <= 8.5, T_8 ~ 140 amplifies
  the truncations' units: up to 7e-3), relu beyond 8 (error 2.7e-3). Coefficients are fitted here, at import, by
  least squares on a dense grid. 9 rounds: the comparisons (4), the clamp, the series (10 by horner).
- `softmax_av` subtracts the row max (compare.maximum: groups of 8, or all pairs for a
  decoding step over a short context; its last level also gives exp's clamp bits; a causal
  prompt's queries are split by the prefix of keys they see, so the keys the public mask hides
  from a query are mostly not compared: in two parts, MAX_PARTS (each call costs the parties'
  compute), 30% fewer bytes for 32 queries), takes
  exp_neg over the keys each query may see, sums, and multiplies (e @ v) by the reciprocal
  of the sum, so the reciprocal and e @ v share rounds.
- `norm_then`: a norm followed by a linear map; the map runs in the rounds of the inverse
  square root (the norm only scales each row) unless scaling first saves more bytes than a round
  is worth. The sum of squares: 1 round; 1/sqrt: 7 (degree 2); the scaling: 1 (+ the map's 1).
Knows nothing of models; model.py folds norm weights and scales into the linear layers.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numpy.polynomial import chebyshev as cheb

from swarmlm.privacy.mpc import bits, compare
from swarmlm.privacy.mpc.inverse import INV_OUT_BITS, inverse_power
from swarmlm.privacy.mpc.ops import (cross_sum, mul, mul_trunc, public_share, reshare_pair, square, stack_shares, trunc,
                                     trunc_sum, unstack_shares)
from swarmlm.privacy.mpc.ring import FRAC_BITS, encode
from swarmlm.privacy.mpc.runtime import Party, Protocol, parallel, tagged
from swarmlm.privacy.mpc.shares import AShare

F = FRAC_BITS
NORM_EXTRA_BITS = 8          # the sum of squares keeps 8 more fractional bits (tiny variances)
EXP_CLAMP = 16.0             # e^-16 ~ 1e-7: below one unit of the fixed point
EXP_EXTRA_BITS = 3           # x/8 as the same integer with 3 more fractional bits
EXP_DEGREE = 12              # Chebyshev degree of e^(x/2) on [-8, 0]: error 3e-7
COARSE = (16, 15)            # (width, drop) of softmax's comparisons: to 1/2, for |x| < 16384
CLAMP = (16, 12)             # GELU's clamps: to 1/16, for |x| < 2040 (relu beyond; larger values wrap)
SILU_CLAMP = (12, 15)        # SiLU's: to 1/2, for |x| < 1020 (12-bit comparisons: 4 blocks of 3 bits, int16 tables)


# ---- exp ---------------------------------------------------------------------------------------

def _fit_exp() -> np.ndarray:
    t = np.linspace(-1.07, 1.07, 4001)                            # the coarse clamp / max pass the ends (by 1/2)
    return cheb.chebfit(t, np.exp(4 * (t - 1)), EXP_DEGREE)       # e^(x/2) for t = x/8 + 1


_EXP_CHEB = _fit_exp()


def exp_neg(p: Party, x: AShare, keep: AShare | None = None) -> Protocol:
    """e^x for x <= 0 (clamped at -EXP_CLAMP; `keep` = [x >= -EXP_CLAMP] if already known): e^(x/2)
    by a degree-12 series, squared. 12 rounds (6 with `keep`)."""
    if keep is None:
        keep = yield from compare.ge0(p, x.add_public(p.index, encode(EXP_CLAMP)), *COARSE)
    x = yield from compare.select(p, keep, x, public_share(p, x.shape, -EXP_CLAMP))
    fb = F + EXP_EXTRA_BITS                                     # the same integers read as x/8
    t = x.add_public(p.index, encode(1.0, fb))                  # x/8 + 1 in [-1, 1]
    e = yield from _chebyshev(p, t, _EXP_CHEB, frac=fb, out_frac=fb)     # e^(x/2), fb bits
    return (yield from square(p, e, shift=2 * fb - F))          # e^x, f bits


def _fold(coeffs: np.ndarray) -> tuple[list[float], list[float], list[float]]:
    """Chebyshev coefficients c_0..c_d (d <= 12) -> (A, B, C) with sum c_k T_k = sum_j A_j T_j
    + T_4 sum_j B_j T_j + T_8 sum_j C_j T_j, j <= 3 (A), <= 3 or 4 (B), <= 4 (C), by
    T_m T_n = (T_(m+n) + T_(m-n)) / 2."""
    c = [float(v) for v in coeffs] + [0.0] * (13 - len(coeffs))
    assert len(c) == 13, "degree 12 at most"
    C = [0.0] * 5
    deep = any(c[9:])
    if deep:
        for j in range(4, 0, -1):
            C[j] = 2 * c[8 + j]
            c[8 - j] -= c[8 + j]
        C[0] = c[8]
        B = [0.0] * 4
    else:
        B = [0.0] * 5
        B[4] = 2 * c[8]
        c[0] -= c[8]
    for j in range(3, 0, -1):
        B[j] = 2 * c[4 + j]
        c[4 - j] -= c[4 + j]
    B[0] = c[4]
    return c[:4], B, (C if deep else [])


def _combo(p: Party, T: dict[int, AShare], coeffs: list[float], frac: int, cbits: int = F) -> AShare:
    """sum_j coeffs_j T_j (T_0 = 1), coefficients with `cbits` bits: frac + cbits fractional bits. Local
    (one multiply-add pass per term)."""
    a, b = torch.zeros_like(T[1].a), torch.zeros_like(T[1].b)
    for j, cf in enumerate(coeffs):
        if j and cf:
            k = int(encode(cf, cbits))
            a.add_(T[j].a, alpha=k)
            b.add_(T[j].b, alpha=k)
    return AShare(a, b).add_public(p.index, encode(coeffs[0], frac + cbits))


def _chebyshev(p: Party, t: AShare, coeffs: np.ndarray, *, frac: int = F, out_frac: int = F,
               extra: torch.Tensor | None = None, horner: bool = False) -> Protocol:
    """sum_k c_k T_k(t) for |t| <= 1 (t with `frac` fractional bits, degree <= 12), with `out_frac`
    bits, plus `extra` (3-out-of-3 components with 2 frac bits) if given.

    T_2; T_3 and T_4; then T_8 with the two inner sums B(t), C(t) truncated; then one product
    round for A(t) + T_4 B(t) + T_8 C(t) (_fold): 4 rounds, 5 products where a doubling ladder
    to degree 12 takes 11. Every value truncated carries at most 2 frac bits (hiding as usual)."""
    A, B, C = _fold(coeffs)
    one = encode(1.0, frac)
    T = {1: t}
    T2 = yield from mul_trunc(p, t.scale(2), t, shift=frac)
    T[2] = T2.add_public(p.index, -one)
    both = yield from mul_trunc(p, stack_shares([T[2], T[2]]).scale(2), stack_shares([T[1], T[2]]), shift=frac)
    T3, T4 = unstack_shares(both, 2)
    T[3], T[4] = T3 - T[1], T4.add_public(p.index, -one)
    if C and horner:
        # A + T4 B + (2 T4^2 - 1) C = (A - C) + T4 (B + 2 T4 C): C truncated, then Y = B + 2 T4 C,
        # then the sum: 5 rounds, 22 ring elements an element where the T8 way takes 4 and 24
        Ct = yield from trunc(p, _combo(p, T, C, frac), F)
        Y = yield from trunc_sum(p, cross_sum([(T[4].scale(2), Ct)]) + _combo(p, T, B, frac, frac).a, frac)
        AC = [a - c for a, c in zip(A + [0.0] * (len(C) - len(A)), C)]
        z = cross_sum([(T[4], Y)]) + _combo(p, T, AC, frac, frac).a
        if extra is not None:
            z = z + extra
        return (yield from trunc_sum(p, z, 2 * frac - out_frac))
    inner = [_combo(p, T, B, frac)] + ([_combo(p, T, C, frac)] if C else [])
    if C:
        T8, inn = yield from parallel(mul_trunc(p, T[4].scale(2), T[4], shift=frac),
                                      trunc(p, stack_shares(inner), F))
        T[8] = T8.add_public(p.index, -one)
        pairs = [(T[4], inn.map(lambda u: u[0])), (T[8], inn.map(lambda u: u[1]))]
    else:
        Bt = yield from trunc(p, inner[0], F)
        pairs = [(T[4], Bt)]
    z = cross_sum(pairs) + _combo(p, T, A, frac, frac).a            # replicated: its 3-out-of-3 part is .a
    if extra is not None:
        z = z + extra
    return (yield from trunc_sum(p, z, 2 * frac - out_frac))


# ---- GELU, SiLU ------------------------------------------------------------------------------

def _gelu_f(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _silu_f(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


def _fit_even(fn, lo: float, hi: float, degree: int = 8, outer: float = 1.0, clamp: tuple[int, int] = CLAMP) -> np.ndarray:
    """Chebyshev coefficients of fn(x) - x/2 on lo <= x <= hi, in t = 2 (x/hi)^2 - 1, by least
    squares with weight `outer` on |x| >= hi/2 (less than 1: more accuracy where most values are)."""
    x = np.linspace(lo, hi + 2.0 ** (clamp[1] - F), 8001)          # the clamp lets x pass B by up to 2^(drop-f)
    return cheb.chebfit(2 * (x / hi) ** 2 - 1, fn(x) - x / 2, degree, w=np.where(x < hi / 2, 1.0, outer))


# (lo, hi: a power of two, coefficients, the clamps' (width, drop))
GELU_PIECES = [(0, 4, _fit_even(_gelu_f, 0.0, 4.0, 8), CLAMP)]                                 # 1.6e-4
SILU_PIECES = [(0, 8, _fit_even(_silu_f, 0.0, 8.0, 12, clamp=SILU_CLAMP), SILU_CLAMP)]         # 2e-4 below 4, 4e-4 to 8.5


def _piecewise_even(p: Party, x: AShare, pieces, out_frac: int = F, horner: bool = False) -> Protocol:
    """x/2 + E(x) for |x| < B, relu(x) beyond (one piece: lo = 0, hi = B a power of two).

    The comparisons with -B and B and w = (x/B)^2 run in the same rounds; t = 2 w - 1 is then
    clamped to 1 outside: inside (w - 1) as a 3-out-of-3 sum (bits.bit_times), reshared (one
    round each; party 0's part is zero: ops.reshare_pair), so the Chebyshev terms stay bounded. The
    relu part needs inside, inside x and [x < -B] x: 3-out-of-3 sums from the same bit_times round
    that join the series' last truncation. Bits to values: 5 ring elements an element (inside: t,
    t (w - 1), t x; below: t, t x; the two x words scaled to 2f bits and cut to 6 bytes), the reshare 2."""
    ((lo, hi, coeffs, clamp),) = pieces
    assert lo == 0
    # the lower threshold is -B less one unit of the coarse comparison: x in [-B - unit, -B) may read as
    # inside (the series covers |x| <= B + unit), x >= -B always does (so relu starts beyond |x| = B)
    unit = 2.0 ** (clamp[1] - F)
    neg, w = yield from parallel(
        compare.msb(p, x.map(lambda t: t.unsqueeze(-1)).add_public(
            p.index, -encode(torch.tensor([-float(hi) - unit, float(hi)], dtype=torch.float64))), *clamp),
        trunc_sum(p, x.a * x.a + 2 * x.a * x.b, F + 2 * int(math.log2(hi))))      # (x / hi)^2
    below, under = neg.map(lambda t: t[..., 0]), neg.map(lambda t: t[..., 1])   # [x < -hi - unit], [x < hi]
    # inside = [-hi - unit <= x < hi] = under ^ below (below implies under: the same coarse value).
    # The bits are used only in products with w - 1 and x and as 0/1, as 3-out-of-3 sums: inside (w - 1),
    # reshared, clamps t; the rest joins the series' last truncation
    # inside x / 2 and below x come with 2f bits (x scaled up): their words may lose their low 16 bits
    half = 1 << (F - 1)
    (clamp_d, inside_x, inside), (below_x, _) = yield from parallel(
        bits.bit_times(p, under ^ below, [w.add_public(p.index, -encode(1.0)), x.scale(half)], cut=1),
        bits.bit_times(p, below, [x.scale(1 << F)], cut=1))
    t = (yield from reshare_pair(p, clamp_d)).scale(2).add_public(p.index, encode(1.0))
    # outside, the series gives its value at t = 1, P(1) = sum of its coefficients (~E(B)); relu wants
    # x/2 + |x|/2 there, x above and 0 below: extra = x/2 + [x >= B] x - outside (x/2 + P(1)),
    # with [x >= B] = 1 - inside - below and outside = 1 - inside: x - below x - inside x / 2 - (1 - inside) P(1).
    # All of it goes into the series' last round with 2f bits (3-out-of-3: a public term at party 0 only).
    p1 = int(encode(float(np.sum(coeffs)), 2 * F))
    extra = x.a * (1 << F) - below_x - inside_x + inside * p1 - (p1 if p.index == 0 else 0)
    return (yield from _chebyshev(p, t, coeffs, out_frac=out_frac, extra=extra, horner=horner))


def gelu(p: Party, x: AShare) -> Protocol:
    """GELU, tanh form (GPT-2's)."""
    return (yield from _piecewise_even(p, x, GELU_PIECES))


def silu(p: Party, x: AShare, out_frac: int = F, horner: bool = False) -> Protocol:
    """SiLU, with `out_frac` fractional bits; `horner`: its series in 5 rounds and fewer bytes (_chebyshev)."""
    return (yield from _piecewise_even(p, x, SILU_PIECES, out_frac, horner))


# ---- norms, softmax ------------------------------------------------------------------------------

MAX_PARTS = 2                # softmax's max: calls over key prefixes (_row_max; each costs the parties' compute)
MAX_ALL_PAIRS = 48           # a decoding step compares all pairs of up to this many keys at once
RSQRT_RANGE = (-12, 20)      # sums of squares the norms handle: 2^-12 (or D eps: _rsqrt_floor) .. 2^20
NORM_STEPS = 4               # the norms' 1/sqrt: 4 thresholds an octave, a degree-2 series (2e-4 relative at most)


def _rsqrt_floor(D: int, eps: float) -> int:
    """The lower end of the norms' range of sums of squares, an even exponent: D eps is added to every
    sum of squares, so none is below it and the comparisons with smaller thresholds are left out
    (the widest ones: 2^-10 for D = 256 and eps = 1e-5, 2^-6 for 4096)."""
    if D * eps <= 0:
        return RSQRT_RANGE[0]
    return min(max(RSQRT_RANGE[0], 2 * math.floor(math.log2(D * eps) / 2)), RSQRT_RANGE[1] - 2)


ROUND_BYTES = 250_000         # bytes that cost as much as one round on the WAN of the bench (20 ms at 100 Mbit/s)


def norm_then(p: Party, x: AShare, *, eps: float, center: bool, project, out_features: int) -> Protocol:
    """`project` (a public linear map to `out_features`, as a protocol on shares) of RMSNorm (center=False)
    or LayerNorm without its affine part, over the last dim D, times 1/sqrt(D):
    (x - mean) / sqrt(sum (x - mean)^2 + D eps). The caller folds sqrt(D) and the norm's weight and
    bias into the map.

    The norm only scales each row, so project(x - mean) can run in the rounds of the inverse
    square root and the scale be applied to its output (one round fewer), or the rows be scaled
    first and projected after (fewer bytes when the map widens: the scale's product is on the
    narrower side): whichever costs less, a round counted as ROUND_BYTES."""
    D = x.shape[-1]
    rows = int(np.prod(x.shape[:-1]))
    if center:
        inv_d = encode(1.0 / D, F + NORM_EXTRA_BITS)
        mean = yield from trunc(p, x.map(lambda t: t.sum(-1, keepdim=True) * inv_d), F + NORM_EXTRA_BITS)
        x = x - mean
    ss = yield from trunc_sum(p, (x.a * x.a + 2 * x.a * x.b).sum(-1), F - NORM_EXTRA_BITS)
    ss = ss.add_public(p.index, encode(D * eps, F + NORM_EXTRA_BITS))
    rsqrt = inverse_power(p, ss, half=True, lo_exp=_rsqrt_floor(D, eps), hi_exp=RSQRT_RANGE[1],
                          frac_in=F + NORM_EXTRA_BITS, steps=NORM_STEPS, degree=2)
    if 32 * (out_features - D) * rows > ROUND_BYTES:          # a product costs 32 bytes an element, three parties
        r = yield from rsqrt
        xn = yield from mul_trunc(p, x, r.map(lambda t: t.unsqueeze(-1)), shift=INV_OUT_BITS)
        return (yield from project(xn))
    r, y = yield from parallel(rsqrt, project(x))
    return (yield from mul_trunc(p, y, r.map(lambda t: t.unsqueeze(-1)), shift=INV_OUT_BITS))


def _row_max(p: Party, masked: AShare, allowed: torch.Tensor, fill: int, group: int) -> Protocol:
    """compare.maximum of each row of `masked` (..., T, S) with [x >= max - EXP_CLAMP], comparing only the
    keys a query may see: the queries are split by the prefix of keys that holds all of theirs (a
    causal prompt's query i sees keys up to past + i), rounded up to a multiple of `group`, and each
    part runs over its prefix, all parts in parallel (no more rounds than one run over all keys); the
    cheapest merges of neighbouring prefixes bring the parts down to MAX_PARTS. The
    mask is public, so which keys are skipped says nothing of the scores; a skipped key's bit is 0."""
    T, S = allowed.shape
    seen = allowed.bool()
    last = torch.where(seen.any(-1), S - seen.flip(-1).to(torch.int64).argmax(-1), 1)     # 1 + the last key seen
    lengths = ((last + group - 1) // group * group).clamp(max=S)
    kw = dict(margin=int(encode(EXP_CLAMP)), width=COARSE[0], drop=COARSE[1])
    parts = sorted(set(lengths.tolist()))
    while len(parts) > MAX_PARTS:           # each part costs the parties' compute: merge the cheapest neighbours
        rows_at = [int((lengths == n).sum()) for n in parts]
        extra = [rows_at[i] * (parts[i + 1] - parts[i]) for i in range(len(parts) - 1)]
        i = extra.index(min(extra))
        lengths = torch.where(lengths == parts[i], parts[i + 1], lengths)
        del parts[i]
    if parts == [S]:
        return (yield from compare.maximum(p, masked, fill, group, **kw))
    rows = [torch.nonzero(lengths == n).flatten() for n in parts]
    outs = yield from parallel(*[compare.maximum(p, masked.map(lambda t, r=r, n=n: t[..., r, :n]), fill, group, **kw)
                                 for r, n in zip(rows, parts)])
    top = AShare(torch.zeros(masked.shape[:-1] + (1,), dtype=torch.int64), torch.zeros(masked.shape[:-1] + (1,), dtype=torch.int64))
    near = AShare(torch.zeros(masked.shape, dtype=torch.int64), torch.zeros(masked.shape, dtype=torch.int64))
    for (tp, nr), r, n in zip(outs, rows, parts):
        for whole, part in ((top.a, tp.a), (top.b, tp.b)):
            whole[..., r, :] = part
        for whole, part in ((near.a, nr.a), (near.b, nr.b)):
            whole[..., r, :n] = part
    return top, near


def softmax_av(p: Party, scores: AShare, allowed: torch.Tensor, v: AShare, fill: float = -10000.0) -> Protocol:
    """softmax(scores) @ v over keys the 0/1 public `allowed` (..., T, S) lets each query see.

    scores (B, H, T, S), v (B, H, S, Dh) -> (B, H, T, Dh)."""
    allowed = allowed.to(torch.int64)
    masked = scores.scale(allowed).add_public(p.index, (1 - allowed) * encode(fill))
    S, T = scores.shape[-1], scores.shape[-2]
    # decoding a short context: all pairs at once (one level); otherwise groups of 8 (two levels
    # up to 64 keys); either way [x >= max - 16] comes from the last level's comparisons, so
    # exp needs no comparison of its own
    group = S if T == 1 and S <= MAX_ALL_PAIRS else 8
    top, keep = yield from tagged(p, "softmax.max", _row_max(p, masked, allowed, int(encode(fill)), group))
    # exp of the keys each query may see only (a prompt's causal mask hides half of them)
    seen = allowed.bool()
    pick = lambda t: t[..., seen]                                        # noqa: E731  (..., n_seen)
    e = yield from tagged(p, "softmax.exp", exp_neg(p, (masked - top).map(pick), None if keep is None else keep.map(pick)))

    def spread(t: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(scores.shape, dtype=torch.int64)
        out[..., seen] = t
        return out
    e = e.map(spread)
    total = e.map(lambda t: t.sum(-1))
    inv, ev = yield from parallel(                      # the sum is at least 1: the max's own key has e^0
        inverse_power(p, total, half=False, lo_exp=0, hi_exp=2 * math.ceil(math.log2(S) / 2 + 0.5)),
        mul_trunc(p, e, v, torch.matmul))
    return (yield from mul_trunc(p, ev, inv.map(lambda t: t.unsqueeze(-1)), shift=INV_OUT_BITS))
