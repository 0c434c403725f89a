"""The dashboard's pure decisions: coverage, holes, staleness and loss history."""

import math

from swarmlm.dashboard.view import MAX_POINTS, Freshness, LossHistory, bottleneck, coverage, holes


def test_coverage_counts_servers_per_block_and_clips_spans():
    assert coverage([(0, 2), (1, 3), (2, 4)], 4) == [1, 2, 2, 1]
    assert coverage([(2, 9), (-1, 1)], 4) == [1, 0, 1, 1]
    assert coverage([], 3) == [0, 0, 0]


def test_holes_are_maximal_runs_of_uncovered_blocks():
    assert holes([0, 1, 0, 0, 2, 0]) == [[0, 1], [2, 4], [5, 6]]
    assert holes([1, 1]) == []
    assert holes([0, 0, 0]) == [[0, 3]]


def test_bottleneck_is_the_slowest_block():
    assert bottleneck([5.0, 2.0, 7.0]) == 2.0
    assert bottleneck([3.0, 0.0]) == 0.0 and bottleneck([]) == 0.0


def test_a_record_not_refreshed_for_half_its_life_is_stale():
    f = Freshness()
    key = ("m", "peer")
    f.observe(key, expires_at=130.0, now=100.0)          # ttl 30: refreshed every 10 s
    assert not f.is_stale(key, now=116.0)
    f.observe(key, expires_at=140.0, now=110.0)          # a refresh
    assert not f.is_stale(key, now=126.0) and f.age(key, now=126.0) == 16.0
    assert f.is_stale(key, now=127.5)                    # 15 s + 2 s slack since the refresh
    f.observe(key, expires_at=140.0, now=128.0)          # the same record again is no refresh
    assert f.is_stale(key, now=128.0)
    f.forget_except([])
    assert not f.is_stale(key, now=200.0)


def test_loss_history_keeps_one_finite_point_per_new_step():
    h = LossHistory()
    assert h.add(1, 2.0) and not h.add(1, 1.9) and not h.add(0, 1.0) and not h.add(2, math.nan)
    assert h.add(3, 1.5)
    assert h.points == [(1, 2.0), (3, 1.5)]
    for step in range(4, 4 + MAX_POINTS):
        h.add(step, 1.0)
    assert len(h.points) == MAX_POINTS and h.points[-1][0] == 3 + MAX_POINTS
