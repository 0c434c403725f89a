"""Span choice and rebalancing decisions (pure)."""

from swarmlm.swarm.server.selection import block_throughputs, choose_span, should_move


def test_block_throughputs_sum_overlapping_spans():
    assert block_throughputs([(0, 2, 10.0), (1, 4, 5.0)], 4) == [10.0, 15.0, 5.0, 5.0]


def test_choose_span_takes_the_weakest_stretch():
    assert choose_span([10.0, 10.0, 0.0, 0.0, 5.0], 2) == range(2, 4)


def test_choose_span_prefers_the_earliest_on_ties():
    assert choose_span([0.0] * 6, 3) == range(0, 3)


def test_servers_joining_one_by_one_cover_every_block():
    n_layers, spans = 8, []
    for _ in range(4):
        span = choose_span(block_throughputs([(s.start, s.stop, 1.0) for s in spans], n_layers), 2)
        spans.append(span)
    assert sorted(i for s in spans for i in s) == list(range(8))


def test_should_move_to_an_uncovered_span():
    # two servers on 0:2, nobody on 2:4
    tps = block_throughputs([(0, 2, 1.0), (0, 2, 1.0)], 4)
    assert should_move(tps, range(0, 2), 1.0) == range(2, 4)


def test_should_not_move_for_a_small_gain():
    tps = block_throughputs([(0, 2, 1.0), (2, 4, 1.1)], 4)
    assert should_move(tps, range(2, 4), 1.1) is None


def test_should_move_when_the_bottleneck_rises_enough():
    # blocks 0:2 hold 3 servers, 2:4 hold one: a server of 0:2 moving doubles the bottleneck
    tps = block_throughputs([(0, 2, 1.0)] * 3 + [(2, 4, 1.0)], 4)
    assert should_move(tps, range(0, 2), 1.0) == range(2, 4)
