"""Choosing a chain of servers (pure)."""

import random

import pytest

from swarmlm.errors import NotFoundError
from swarmlm.swarm.client.routing import Hop, ServerInfo, choose_chain, format_blocks, uncovered_blocks


def S(peer, start, end, tps=100.0, **kw):
    return ServerInfo(peer, start, end, tps, **kw)


def test_chain_covers_the_span_with_the_fewest_hops_when_servers_are_equal():
    servers = [S("a", 0, 2), S("b", 2, 4), S("c", 0, 4)]
    chain = choose_chain(servers, 0, 4, rtt_s={}, rng=random.Random(0), jitter=0.0)
    assert chain == [Hop("c", 0, 4)]


def test_chain_avoids_a_slow_server():
    servers = [S("a", 0, 2), S("b", 2, 4), S("slow", 0, 4, tps=1.0)]
    chain = choose_chain(servers, 0, 4, rtt_s={}, rng=random.Random(0), jitter=0.0)
    assert [h.peer_id for h in chain] == ["a", "b"]


def test_chain_avoids_a_far_server():
    servers = [S("a", 0, 4), S("b", 0, 4)]
    chain = choose_chain(servers, 0, 4, rtt_s={"a": 1.0, "b": 0.001}, rng=random.Random(0), jitter=0.0)
    assert chain == [Hop("b", 0, 4)]


def test_chain_may_use_part_of_a_span():
    servers = [S("a", 0, 3), S("b", 2, 4)]
    chain = choose_chain(servers, 0, 4, rtt_s={}, rng=random.Random(0), jitter=0.0)
    assert chain[0].peer_id == "a" and chain[-1] == Hop("b", chain[0].end, 4)


def test_load_spreads_clients_over_replicas():
    servers = [S("a", 0, 4), S("b", 0, 4)]
    rng = random.Random(1)
    picks = {choose_chain(servers, 0, 4, rtt_s={}, rng=rng)[0].peer_id for _ in range(20)}
    assert picks == {"a", "b"}


def test_own_sessions_count_as_load():
    servers = [S("a", 0, 4), S("b", 0, 4)]
    chain = choose_chain(servers, 0, 4, rtt_s={}, rng=random.Random(0), own_load={"a": 3}, jitter=0.0)
    assert chain == [Hop("b", 0, 4)]


def test_no_chain_names_the_uncovered_blocks():
    servers = [S("a", 0, 2), S("b", 3, 4), S("c", 2, 3)]
    with pytest.raises(NotFoundError, match="blocks 2$"):
        choose_chain(servers, 0, 4, rtt_s={}, rng=random.Random(0), banned={"c"})


def test_servers_without_free_cache_are_skipped():
    servers = [S("a", 0, 4, free_cache_tokens=10), S("b", 0, 4, free_cache_tokens=1000)]
    chain = choose_chain(servers, 0, 4, rtt_s={"b": 1.0}, rng=random.Random(0), need_cache_tokens=100)
    assert chain == [Hop("b", 0, 4)]


def test_uncovered_blocks_and_their_format():
    assert uncovered_blocks([S("a", 0, 2), S("b", 5, 6)], 0, 8) == [2, 3, 4, 6, 7]
    assert format_blocks([2, 3, 4, 6, 7]) == "2..4, 6..7"
