"""Shared bits times values: `b2a` (a bit as an arithmetic 0/1), `inject` (a bit times a value,
replicated) and `bit_times` (bits times values as 3-out-of-3 sums, for a truncation or reshare next).

Each is one round of three-party transfers built on one decomposition of an XOR-shared bit
b = b_0 ^ b_1 ^ b_2: b = b_2 + s t with t = b_0 ^ b_1 (party 0 knows it) and s = 1 - 2 b_2
(parties 1 and 2 know it), and of a value v = V + v_2 with V = v_0 + v_1 (party 0): party 0
sends t (and t V) under pads it shares with one of the others, and the products with s (and
s v_2) are local to parties 1 and 2; where a replicated result is wanted, parties 1 and 2 also
send each other the part the other lacks, under a component it does not know. What any party
receives is ring elements under pads or components unknown to it: uniform.
Knows nothing of comparisons (compare.py produces the bits) or of models.
"""

from __future__ import annotations

import torch

from swarmlm.privacy.mpc.ops import CUT_FROM, top_bytes, word_spec, words_from_top
from swarmlm.privacy.mpc.runtime import Party, Protocol, Round
from swarmlm.privacy.mpc.shares import AShare, BShare


def b2a(p: Party, bit: BShare) -> Protocol:
    """XOR-shared bit (bit 0 of words) -> arithmetic 0/1 share. One round, four ring elements.

    b = t xor b2 = b2 + s t with s = 1 - 2 b2, where party 0 knows t = b0 xor b1 and parties
    1 and 2 know b2 (so s). The result is shared as (c0, c1, c2): c0 from the PRG of parties 0
    and 2, c1 from that of parties 0 and 1, and c2 = b2 + s t - c0 - c1, which parties 1 and 2
    both compute: party 0 sends y = t + p0 to party 1 and y' = t + p1 to party 2 (p0 a pad of
    parties 0 and 2, p1 one of parties 0 and 1); party 2 sends s p0 + c0 to party 1 and party 1
    sends s p1 + c1 to party 2 (both know s), so party 1 gets s y - (s p0 + c0) = s t - c0 and
    party 2 gets s y' - (s p1 + c1) = s t - c1. What party 1 receives, (t + p0, s p0 + c0), is
    two ring elements under two pads it does not know (p0, c0: uniform, independent), and so
    for party 2 (p1, c1); party 0 receives nothing."""
    shape = bit.a.shape
    spec = (tuple(shape), torch.int64)
    if p.index == 0:
        t = (bit.a ^ bit.b) & 1
        g1, g2 = p.prg(1, "b2a"), p.prg(2, "b2a")
        c1, p1 = g1.ring(shape), g1.ring(shape)
        c0, p0 = g2.ring(shape), g2.ring(shape)
        yield Round(send={1: [t + p0], 2: [t + p1]})
        return AShare(c0, c1)
    me, other = p.index, 3 - p.index
    b2 = (bit.b if me == 1 else bit.a) & 1                              # parties 1 and 2 both hold b2
    s = 1 - 2 * b2
    g0 = p.prg(0, "b2a")
    mine, pad = g0.ring(shape), g0.ring(shape)                         # (c1, p1) at party 1, (c0, p0) at party 2
    got = yield Round(send={other: [s * pad + mine]}, recv={0: [spec], other: [spec]})
    c2 = b2 + s * got[0][0] - got[other][0] - mine
    return AShare(mine, c2) if me == 1 else AShare(c2, mine)


def inject(p: Party, bit: BShare, v: AShare) -> Protocol:
    """bit * v for an XOR-shared bit (bit 0 of int64 words) and an arithmetic v of the same shape.
    One round (b2a and a product take two), six ring elements an element.

    bit = b_2 + s t with t = b_0 ^ b_1 (party 0), s = 1 - 2 b_2 (parties 1 and 2), and v = V + v_2
    with V = v_0 + v_1 (party 0): bit v = b_2 (v_0 + v_1 + v_2) + s (t V) + (s v_2) t. The result
    is shared as (c0, c1, c2), c0 from the PRG of parties 0 and 2, c1 from that of parties 0 and 1,
    and c2 = bit v - c0 - c1, which parties 1 and 2 both compute (b2a's way): party 0 sends t V + p
    and t + p' to party 1 (p, p' pads of parties 0 and 2) and t V + q, t + q' to party 2 (pads of
    parties 0 and 1); party 2 sends party 1 b_2 v_0 - c0 - s p - s v_2 p', party 1 sends party 2
    b_2 v_1 - c1 - s q - s v_2 q'. Party 1 takes b_2 (v_1 + v_2) + s (t V + p) + s v_2 (t + p') plus
    that, less c1; so does party 2, symmetrically. Each receives ring elements under pads or components it
    does not know (p, p', c0 for party 1; q, q', c1 for party 2); party 0 receives nothing."""
    shape = v.shape
    spec = (tuple(shape), torch.int64)
    if p.index == 0:
        t = (bit.a ^ bit.b) & 1
        tV = t * (v.a + v.b)
        g1, g2 = p.prg(1, "inj"), p.prg(2, "inj")
        c1, q, q2 = g1.ring(shape), g1.ring(shape), g1.ring(shape)
        c0, p0, p2 = g2.ring(shape), g2.ring(shape), g2.ring(shape)
        yield Round(send={1: [tV + p0, t + p2], 2: [tV + q, t + q2]})
        return AShare(c0, c1)
    me, other = p.index, 3 - p.index
    if me == 1:                                                         # holds (v_1, v_2), bit (b_1, b_2)
        b2, v_other, v2 = bit.b & 1, v.a, v.b
    else:                                                               # holds (v_2, v_0), bit (b_2, b_0)
        b2, v_other, v2 = bit.a & 1, v.b, v.a
    s = 1 - 2 * b2
    g0 = p.prg(0, "inj")
    mine, pad, pad2 = g0.ring(shape), g0.ring(shape), g0.ring(shape)    # (c1, q, q') at party 1, (c0, p, p') at 2
    got = yield Round(send={other: [b2 * v_other - mine - s * pad - s * v2 * pad2]},
                      recv={0: [spec, spec], other: [spec]})
    c2 = b2 * (v_other + v2) + s * got[0][0] + s * v2 * got[0][1] + got[other][0] - mine
    return AShare(mine, c2) if me == 1 else AShare(c2, mine)


def bit_times(p: Party, bit: BShare, ys: list[AShare], cut: int = 0) -> Protocol:
    """This party's 3-out-of-3 components of bit * y for each y in `ys`, and of the bit itself, as
    a list (an XOR-shared bit, bit 0 of int64 words, and replicated values of its shape): for sums
    that are truncated or reshared next (ops.trunc_sum and ops.reshare re-randomize them). One
    round, 1 + len(ys) ring elements an element, party 0 to party 1.

    bit = b_2 + s t with t = b_0 ^ b_1 (party 0), s = 1 - 2 b_2 (parties 1 and 2), and y = Y + y_2
    with Y = y_0 + y_1 (party 0): bit y = b_2 y + s (t Y) + (s y_2) t. b_2 y is local (party 1:
    b_2 y_1, party 2: b_2 (y_2 + y_0)); party 0 sends t + q and each t Y + q_y to party 1, q and
    q_y pads of parties 0 and 2, so party 1 holds s (t Y + q_y) + s y_2 (t + q) and party 2 the
    pads' part, -s q_y - s y_2 q (and the bit: b_2 + s (t + q) at party 1, -s q at party 2). Party
    1 receives ring elements under pads it does not know; party 2 receives nothing.

    The last `cut` values' words travel without their low 16 bits (6 bytes of 8, in calls of
    ops.CUT_FROM elements or more): bit y is then off by less than 2^16, which the caller makes less
    than a unit of what it keeps (y scaled up by 2^16 or so, the sum truncated by as much)."""
    shape = bit.a.shape
    spec = (tuple(shape), torch.int64)
    n = len(ys)
    keep = [8] * (n - cut) + [6 if bit.a.numel() >= CUT_FROM else 8] * cut
    if p.index == 0:
        t = (bit.a ^ bit.b) & 1
        g = p.prg(2, "bitx")
        q = g.ring(shape)
        qs = [g.ring(shape) for _ in ys]
        yield Round(send={1: [t + q] + [top_bytes(t * (y.a + y.b) + qy, k) for y, qy, k in zip(ys, qs, keep)]})
        return [torch.zeros(shape, dtype=torch.int64) for _ in range(n + 1)]
    b2 = (bit.b if p.index == 1 else bit.a) & 1
    s = 1 - 2 * b2
    if p.index == 1:                                                    # holds (y_1, y_2)
        got = (yield Round(recv={0: [spec] + [word_spec(shape, k)[0] for k in keep]}))[0]
        ms = [m if k == 8 else words_from_top(m, k) for m, k in zip(got[1:], keep)]
        return [b2 * y.a + s * m + s * y.b * got[0] for y, m in zip(ys, ms)] + [b2 + s * got[0]]
    g = p.prg(0, "bitx")                                                # party 2 holds (y_2, y_0)
    q = g.ring(shape)
    qs = [g.ring(shape) for _ in ys]
    yield Round()
    return [b2 * (y.a + y.b) - s * qy - s * y.a * q for y, qy in zip(ys, qs)] + [-s * q]
