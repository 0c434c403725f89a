"""`inverse_power`: 1/v and 1/sqrt(v) over a wide range, for softmax and the norms (funcs.py).

v is compared with public thresholds 2^(k/4) all at once (one comparison depth); the bits bring v into [1, 4) and
select, by a public linear combination (no message), a first guess y0 within 2^(1/8) of the
answer, then v^-a = y0 (1 - e)^-a with e = 1 - v y0^(1/a), |e| < 0.09 (0.11 with the
comparisons' 2^-6 relative precision). The piecewise-constant functions of the interval
(y0, its picks per 4^i, ...) are public tables applied to the bits by one local product,
built from the differences of their encoded values (so a zero piece is exactly zero). Then
either (degree 3, the softmax's 1/x) e; e^2 and c3 e; one sum of products: 3 rounds, or
(degree 2, the norms' 1/sqrt) a degree-2 polynomial fitted on |e| <= 0.11: e, k1 Y e and
k2 Y e (Y = y0 4^(-a i), piecewise constant like the picks, so Y e is the same kind of sum)
in one round, then (k2 Y e) e: 2 rounds, 2e-4 relative at most (1e-4 with degree 3). v / 4^i
is truncated for every i at once (in the comparisons' rounds): each truncation hides v as
well as any other does while v, read as an integer, stays below 2^42; the k Y e sums are
below 2^46 (15 bits of hiding) only at the smallest sums of squares (Y = 2^6), 2^36 for
sums of squares near D. Comparison (5 rounds at width 40) + 3 or 2 rounds. Each octave of
thresholds drops the bits below its smallest threshold's relative precision, so the larger
thresholds compare on fewer bits (8 to 40 for the norms), with table blocks chosen for bytes
within the widest comparison's tree levels (no extra round); octaves whose tables cost the same
share one comparison call, and the cheapest merges bring the calls down to MAX_GROUPS = 2
(one for fewer than 64 thresholds; _threshold_groups)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from swarmlm.privacy.mpc import compare
from swarmlm.privacy.mpc.ops import cross_sum, mul_trunc, stack_shares, trunc, trunc_sum
from swarmlm.privacy.mpc.ring import FRAC_BITS, encode
from swarmlm.privacy.mpc.runtime import Party, Protocol, parallel
from swarmlm.privacy.mpc.shares import AShare

F = FRAC_BITS
STEPS = 4                    # thresholds per octave: a first guess within 2^(1/8), so |e| < 0.09
MAX_GROUPS = 2               # comparison calls per inverse_power (each costs the parties' compute)
SERIES_DEGREE = 3            # (1 - e)^-a summed to e^3 (fixed: inverse_power's last two rounds)
INV_OUT_BITS = F + 8         # fractional bits of inverse_power's result (1/sqrt(2^20) keeps 14 bits)


def inverse_power(p: Party, v: AShare, *, half: bool, lo_exp: int, hi_exp: int, frac_in: int = F,
                  steps: int = STEPS, degree: int = SERIES_DEGREE) -> Protocol:
    """v^-1 (half=False) or v^-1/2 (half=True) for v in [2^lo_exp, 2^hi_exp] (even exponents; v
    fixed point with `frac_in` fractional bits); the result has INV_OUT_BITS fractional bits.

    v is compared with 2^(k/steps) for every k at once, while v / 4^i is computed for every i
    (a truncation by a public amount, exact however large or small v is). The bits tell v's
    interval [4^i, 4^(i+1)), so m = v / 4^i in [1, 4), and a first guess y0 of m^-a within
    2^(1/(2 steps)); e = 1 - m y0^(1/a) is one product of bit-selected public values with the
    v / 4^i (|e| < 0.09 with 4 steps), then m^-a = y0 (1 - e)^-a, times the public 4^(-a i):
    - degree 3: (1 - e)^-a summed to e^3: e; e^2 and c3 e; one sum of products: 3 rounds;
    - degree 2: a degree-2 polynomial k0 + k1 e + k2 e^2 fitted on |e| <= emax (_series2: 2e-4
      relative at most for 1/sqrt with 4 steps); Y = y0 4^(-a i) is piecewise constant in the
      interval, so Y e, like e, is a sum of bit-selected public values times the v / 4^i: e,
      k1 Y e and k2 Y e in one round, Y k0 + k1 Y e + (k2 Y e) e in the next: 2 rounds.
    The comparison is 5 rounds at width 40 (its smallest thresholds; the others on fewer bits)."""
    assert lo_exp % 2 == 0 and hi_exp % 2 == 0 and degree in (2, 3)
    tab = _inverse_tables(half, lo_exp, hi_exp, frac_in, steps, degree)
    Q = len(tab.shifts)
    view = (-1,) + (1,) * len(v.shape)
    bits, scaled = yield from parallel(
        _compare_all(p, v, tab),
        trunc(p, stack_shares([v] * Q).scale(tab.up.view(view)), tab.shifts.clamp(min=0).view(view)))   # (Q, ...): v / 4^i
    scaled = scaled.map(lambda t: torch.movedim(t, 0, -1))                                      # (..., Q)
    fine, wide = _table_combination(p, bits, tab.fine), _table_combination(p, bits, tab.wide)
    picks = fine.map(lambda t: t[..., :Q])                                                     # y0^(1/a) in its 4^i, else 0
    if degree == 2:
        # e, k1 Y e, k2 Y e: sums over i of (picks, k Y picks) times v / 4^i, one truncation round
        k1yp, k2yp = wide.map(lambda t: t[..., :Q]), wide.map(lambda t: t[..., Q:2 * Q])
        raw = torch.stack([_cross_rows(picks, scaled), _cross_rows(k1yp, scaled), _cross_rows(k2yp, scaled)])
        sums = yield from trunc_sum(p, raw, F)
        e = (-sums.map(lambda t: t[0])).add_public(p.index, encode(1.0))
        k1ye = wide.map(lambda t: t[..., 2 * Q]) - sums.map(lambda t: t[1])
        k2ye = wide.map(lambda t: t[..., 2 * Q + 1]) - sums.map(lambda t: t[2])
        last = yield from mul_trunc(p, k2ye, e)
        return last + k1ye + wide.map(lambda t: t[..., 2 * Q + 2])
    e = yield from trunc_sum(p, _cross_rows(picks, scaled))
    e = (-e).add_public(p.index, encode(1.0))
    c1, c2, c3, y = [wide.map(lambda t, j=j: t[..., j]) for j in range(4)]
    # c1 e + c2 e^2 + c3 e^3 in two rounds: e^2 and c3 e, then one sum of products
    e2, c3e = yield from parallel(mul_trunc(p, e, e), mul_trunc(p, c3, e))
    out = yield from trunc_sum(p, cross_sum([(c1, e), (c2, e2), (c3e, e2)]))
    return out + y


def _compare_all(p: Party, v: AShare, tab: "_InverseTables") -> Protocol:
    """[v >= threshold] (..., K) for every threshold, each group of thresholds on the fewest bits its
    relative precision allows (the groups in parallel: the widest, the smallest thresholds', sets the rounds)."""
    col = v.map(lambda t: t.unsqueeze(-1))
    levels = compare.tree_levels(max(width for _, _, width, _ in tab.groups))
    parts = yield from parallel(*[compare.ge0(p, col.add_public(p.index, -tab.thresholds[s:e]), width, drop, levels)
                                  for s, e, width, drop in tab.groups])
    return AShare(torch.cat([b.a for b in parts], -1), torch.cat([b.b for b in parts], -1))


def _cross_rows(x: AShare, y: AShare) -> torch.Tensor:
    """This party's 3-out-of-3 component of sum over the last dim of x * y."""
    return (x.a * y.a + x.a * y.b + x.b * y.a).sum(-1)


@dataclass(frozen=True)
class _InverseTables:
    thresholds: torch.Tensor     # (K,) encoded with frac_in bits
    groups: tuple[tuple[int, int, int, int], ...]   # (start, end, width, drop): thresholds compared alike
    shifts: torch.Tensor         # (Q,) v / 4^i: truncation shifts (negative: scaled up first)
    up: torch.Tensor             # (Q,)
    fine: tuple[torch.Tensor, torch.Tensor]   # piecewise-constant functions with f bits: (deltas (K, M), base (M,))
    wide: tuple[torch.Tensor, torch.Tensor]   # the same with INV_OUT_BITS bits


def _table(values: list[list[float]], frac: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Piecewise-constant functions of the interval (M lists of K + 1 values) -> the differences of their
    encoded values (K, M) and the first values (M,): exact sums (a zero piece stays zero)."""
    enc = encode(torch.tensor(values, dtype=torch.float64), frac)
    return (enc[:, 1:] - enc[:, :-1]).T.contiguous(), enc[:, 0].contiguous()


@functools.lru_cache(maxsize=64)
def _inverse_tables(half: bool, lo_exp: int, hi_exp: int, frac_in: int, steps: int, degree: int) -> _InverseTables:
    """inverse_power's public constants, computed once per configuration."""
    ks = list(range(steps * lo_exp, steps * hi_exp + 1))              # thresholds 2^(k/steps)
    thresholds = encode(torch.tensor([2.0 ** (k / steps) for k in ks], dtype=torch.float64), frac_in)
    a = 0.5 if half else 1.0
    # the comparisons keep a relative precision of 2^-8 (1/v) or 2^-6 (1/sqrt(v), whose series
    # converges faster) at the smallest threshold, dropping the bits below it, and cover v up
    # to 2^hi_exp
    precision = 6 if half else 8
    groups = _threshold_groups(ks, steps, frac_in, hi_exp, precision)
    quads = list(range(lo_exp // 2, hi_exp // 2))                       # v / 4^i for each of these i
    shifts = torch.tensor([2 * i + frac_in - F for i in quads], dtype=torch.int64)
    up = torch.where(shifts < 0, 1 << (-shifts).clamp(min=0), torch.ones_like(shifts))
    # per threshold interval (below the first, then [2^(k/steps), 2^((k+1)/steps))): its 4^i, m's midpoint
    starts = [ks[0] - 1] + ks
    quad_of = [_quad(k, quads, steps) for k in starts]
    mids = [2.0 ** ((k - 2 * steps * q + 0.5) / steps) for k, q in zip(starts, quad_of)]
    guess = [md ** -a for md in mids]
    # y0^(1/a) where v's interval lies in 4^i, else 0: e = 1 - sum_i that * v / 4^i
    picks = [[g ** (1 / a) if q == i else 0.0 for g, q in zip(guess, quad_of)] for i in quads]
    ys = [g * 4.0 ** (-a * q) for g, q in zip(guess, quad_of)]          # Y = y0 4^(-a i)
    if degree == 2:
        k0, k1, k2 = _series2(a, steps, precision)
        wide = [[k * y * c for y, c in zip(ys, pk)] for k in (k1, k2) for pk in picks]
        wide += [[k * y for y in ys] for k in (k1, k2, k0)]
    else:
        series = [math.comb(2 * k, k) / 4 ** k if half else 1.0 for k in range(SERIES_DEGREE + 1)]
        wide = [[c * y for y in ys] for c in series[1:]] + [ys]
    return _InverseTables(thresholds, tuple(groups), shifts, up, _table(picks, F), _table(wide, INV_OUT_BITS))


def _threshold_groups(ks: list[int], steps: int, frac_in: int, hi_exp: int, precision: int) -> list[tuple[int, int, int, int]]:
    """(start, end, width, drop) of runs of thresholds compared alike: each octave's thresholds may drop the
    bits below its smallest one's relative precision (fewer bits above), and consecutive octaves whose
    comparisons cost the same tables (compare.table_cost, within the widest's tree levels) share one call
    (each call costs the parties' compute, so as few as the bytes allow)."""
    def at(start: int) -> tuple[int, int]:
        drop = max(0, frac_in + math.floor(ks[start] / steps) - precision)
        return min(64 - drop, hi_exp + frac_in - drop + 2), drop
    levels = compare.tree_levels(at(0)[0])
    groups: list[list[int]] = []
    for start in range(0, len(ks), steps):
        end = min(start + steps, len(ks))
        width, drop = at(start)
        if groups and compare.table_cost(groups[-1][2], levels) == compare.table_cost(width, levels):
            groups[-1][1] = end
        else:
            groups.append([start, end, width, drop])
    # merge the neighbours whose merging adds the fewest bytes; a second call pays for many thresholds only
    while len(groups) > (MAX_GROUPS if len(ks) >= 64 else 1):
        extra = [(compare.table_cost(groups[i][2], levels) - compare.table_cost(groups[i + 1][2], levels))
                 * (groups[i + 1][1] - groups[i + 1][0]) for i in range(len(groups) - 1)]
        i = extra.index(min(extra))
        groups[i][1] = groups[i + 1][1]
        del groups[i + 1]
    return [tuple(g) for g in groups]


def _table_combination(p: Party, bits: AShare, table: tuple[torch.Tensor, torch.Tensor]) -> AShare:
    """The piecewise-constant functions of `table` at the compared value, from its comparison bits (..., K):
    (..., M). Local."""
    deltas, base = table
    return bits.map(lambda t: t @ deltas).add_public(p.index, base)


def _quad(k: int, quads: list[int], steps: int = STEPS) -> int:
    """The 4^i interval holding threshold interval k (clamped to the covered ones)."""
    return min(max(k // (2 * steps), quads[0]), quads[-1])


def _series2(a: float, steps: int, precision_bits: int) -> tuple[float, float, float]:
    """(k0, k1, k2): k0 + k1 e + k2 e^2 ~ (1 - e)^-a for |e| up to 2^(1/(2 steps)) (1 + 2^-precision) - 1
    (the first guess's half interval, widened by the comparisons' relative precision), least squares."""
    emax = 2.0 ** (1 / (2 * steps)) * (1 + 2.0 ** -precision_bits) - 1
    e = np.linspace(-emax, emax, 2001)
    k2, k1, k0 = np.polyfit(e, (1 - e) ** -a, 2)
    return float(k0), float(k1), float(k2)
