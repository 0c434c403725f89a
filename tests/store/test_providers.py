"""Provider records and the replication decisions made from them (pure, no network)."""

import asyncio

import pytest

from swarmlm.p2p import keys
from swarmlm.p2p.memory import MemoryNetwork, MemoryPeer
from swarmlm.store.providers import (ProviderRecord, announce, find_providers, plan_replication, rank_providers,
                                     rendezvous_rank)

ROOT = "bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi"
PEERS = [f"peer{i}" for i in range(8)]


def test_every_peer_computes_the_same_order():
    assert rendezvous_rank(ROOT, PEERS) == rendezvous_rank(ROOT, list(reversed(PEERS)))
    assert rendezvous_rank(ROOT, PEERS) != rendezvous_rank(ROOT + "x", PEERS)


def test_rank_providers_leaves_out_banned_peers_and_me():
    ranked = rank_providers(ROOT, PEERS, banned=["peer1"], me="peer2")
    assert "peer1" not in ranked and "peer2" not in ranked and len(ranked) == 6


def test_only_the_leader_plans_and_asks_for_the_missing_copies():
    holders = ["peer0", "peer3"]
    leader = rendezvous_rank(ROOT, holders)[0]
    follower = holders[1] if leader == holders[0] else holders[0]
    asked = plan_replication(ROOT, me=leader, holders=holders, candidates=PEERS, target=4)
    assert len(asked) == 2 and not set(asked) & set(holders)
    assert plan_replication(ROOT, me=follower, holders=holders, candidates=PEERS, target=4) == []


def test_enough_copies_means_nothing_to_do():
    assert plan_replication(ROOT, me="peer0", holders=["peer0", "peer1"], candidates=PEERS, target=2) == []


def test_provider_record_with_negative_size_fails_its_check():
    with pytest.raises(ValueError):
        ProviderRecord(root=ROOT, size_bytes=-1, replicas=1, maddrs=[]).check()


def test_announced_providers_are_found_and_invalid_ones_dropped():
    async def go():
        net = MemoryNetwork()
        a, b, c = [await MemoryPeer.create(net) for _ in range(3)]
        await announce(a, ROOT, size_bytes=10, replicas=2, ttl_s=30)
        await b.store(keys.providers_key(ROOT), ProviderRecord(root=ROOT, size_bytes=-5, replicas=1, maddrs=[]),
                      ttl_s=30, subkey=b.peer_id)                        # fails its check: dropped on read
        await b.store(keys.providers_key(ROOT), ProviderRecord(root="bafyother", size_bytes=5, replicas=1,
                                                               maddrs=[]), ttl_s=30, subkey=b.peer_id + "/x")
        return a, await find_providers(c, ROOT)
    a, found = asyncio.run(go())
    assert [(p.peer_id, p.record.replicas) for p in found] == [(a.peer_id, 2)]
