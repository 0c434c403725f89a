"""check_plan refuses impossible plans before launch; split_layers cuts stages evenly."""

import pytest

from swarmlm.errors import PlanError
from swarmlm.model.config import PRESETS
from swarmlm.parallel.mesh import ParallelPlan, check_plan, split_layers

TINY = PRESETS["tiny"]   # 4 layers, 4 heads, 2 kv heads


def check(world, **degrees):
    return check_plan(TINY, world, ParallelPlan(**degrees), seq_len=32, batch_size=8)


def test_valid_hybrid_plan_passes():
    assert check(8, dp=2, tp=2, pp=2).world_size == 8


def test_tp_not_dividing_kv_heads_is_refused():
    with pytest.raises(PlanError, match="key/value heads"):
        check(4, tp=4)


def test_tp_not_dividing_heads_is_refused():
    with pytest.raises(PlanError, match="attention heads"):
        check_plan(TINY.replace(n_heads=6, n_kv_heads=6, dim=96), 4, ParallelPlan(tp=4), seq_len=32, batch_size=8)


def test_more_pipeline_stages_than_layers_is_refused():
    with pytest.raises(PlanError, match="only 4 layers"):
        check(8, pp=8)


def test_interleaved_schedule_counts_two_stages_per_rank():
    with pytest.raises(PlanError, match="6 pipeline stages"):
        check(3, pp=3, pp_schedule="interleaved-1f1b")


def test_mesh_not_matching_world_size_is_refused():
    with pytest.raises(PlanError, match="needs 4 processes, but the world has 2"):
        check(2, dp=2, tp=2)


def test_cp_with_unsplittable_sequence_is_refused():
    with pytest.raises(PlanError, match="cannot split a sequence of 30 tokens"):
        check_plan(TINY, 4, ParallelPlan(cp=4), seq_len=30, batch_size=8)


def test_batch_not_splitting_over_data_ranks_is_refused():
    with pytest.raises(PlanError, match="global batch of 6 rows"):
        check_plan(TINY, 4, ParallelPlan(dp=4), seq_len=32, batch_size=6)


def test_unknown_schedule_and_bad_degree_are_refused():
    with pytest.raises(PlanError, match="pp-schedule"):
        check(2, pp=2, pp_schedule="zigzag")
    with pytest.raises(PlanError, match="--tp must be a positive integer"):
        check(1, tp=0)


def test_split_layers_gives_consecutive_nearly_equal_ranges():
    assert split_layers(5, 2) == [range(0, 3), range(3, 5)]
    assert split_layers(4, 4) == [range(i, i + 1) for i in range(4)]
