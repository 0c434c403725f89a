"""The pure bookkeeping of a round's parts: who owns what, when a part is complete, the aggregate."""

import itertools

import pytest
import torch

from swarmlm.collab.parts import Assembly, Contribution, OwnedPart, PartPlan, combine, part_bounds, suspects
from swarmlm.errors import WireError

MEMBERS = ("a", "b", "c")


def test_part_bounds_cover_the_vector_in_a_multiple_of_members():
    b = part_bounds(1000, 3, max_part_elems=100)
    assert len(b) % 3 == 0 and b[0][0] == 0 and b[-1][1] == 1000
    assert all(x[1] == y[0] for x, y in itertools.pairwise(b)) and max(e - s for s, e in b) <= 100


def test_each_member_owns_every_nth_part_and_sends_the_rest_in_global_order():
    plan = PartPlan(MEMBERS, "b", part_bounds(900, 3, max_part_elems=100))
    assert plan.owned == [1, 4, 7]
    assert plan.sent() == [0, 2, 3, 5, 6, 8]
    assert plan.sends() == {"a": [0, 3, 6], "c": [2, 5, 8]}
    assert {plan.owner(p) for p in plan.owned} == {"b"}


def test_a_part_completes_with_every_members_first_contribution():
    own = OwnedPart(4)
    assert own.add("a", Contribution(torch.ones(4), 1.0))
    assert not own.add("a", Contribution(torch.zeros(4), 9.0))      # a repeat keeps the first
    assert own.add("b", Contribution(torch.zeros(4), 3.0))
    assert not own.complete(3) and own.missing(MEMBERS) == {"c"}
    assert own.add("c", Contribution(None, 1.0, "undecodable"))
    assert own.complete(3)


def test_combine_drops_malformed_contributions_with_a_reason_and_weights_the_mean():
    own = OwnedPart(4)
    own.add("a", Contribution(torch.ones(4), 1.0))
    own.add("b", Contribution(torch.zeros(4), 3.0))
    own.add("c", Contribution(torch.full((4,), float("nan")), 1.0))
    own.add("d", Contribution(None, 1.0, "undecodable"))
    res = combine(own, aggregator="mean", compression="none")
    assert torch.allclose(res.aggregate, torch.full((4,), 0.25))
    assert res.total_weight == 4.0 and res.n_kept == 2
    assert dict(res.dropped) == {"c": "contains NaN or inf", "d": "undecodable"}


def test_with_lossy_compression_the_owner_keeps_what_the_others_decode():
    own = OwnedPart(1000)
    own.add("a", Contribution(torch.randn(1000), 1.0))
    res = combine(own, aggregator="mean", compression="int8")
    assert not torch.equal(res.local, res.aggregate)
    assert (res.local - res.aggregate).abs().max() < 0.05


def test_a_part_with_nothing_well_formed_cannot_be_combined():
    own = OwnedPart(4)
    own.add("a", Contribution(None, 1.0, "undecodable"))
    with pytest.raises(ValueError):
        combine(own, aggregator="mean", compression="none")


def test_a_timed_out_round_blames_who_never_sent_an_owned_part():
    plan = PartPlan(MEMBERS, "a", part_bounds(30, 3, max_part_elems=10))
    own = OwnedPart(10)
    own.add("a", Contribution(torch.zeros(10), 1.0))
    own.add("b", Contribution(torch.zeros(10), 1.0))
    assert suspects(plan, {0: own}, set(), timed_out=True) == {"c"}
    assert suspects(plan, {0: own}, {"b", "a"}, timed_out=False) == {"b"}


def test_the_assembly_refuses_non_finite_or_repeated_answers():
    plan = PartPlan(MEMBERS, "a", part_bounds(30, 3, max_part_elems=10))
    asm = Assembly(plan, 30)
    with pytest.raises(WireError):
        asm.accept(1, torch.full((10,), float("inf")), 2.0)
    for p, w in zip(range(3), [3.0, 2.0, 3.0]):
        asm.accept(p, torch.full((10,), float(p)), w)
    with pytest.raises(WireError):
        asm.accept(2, torch.zeros(10), 3.0)
    assert asm.complete and asm.total_weight() == 2.0
    assert torch.equal(asm.out, torch.arange(3.0).repeat_interleave(10))
