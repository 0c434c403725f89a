"""Matchmaking's lineage check: a joiner at the leader's step with another model must download it first."""

from __future__ import annotations

import asyncio

import pytest

from swarmlm.collab.matchmaking import FellBehind, Matchmaker
from swarmlm.p2p.memory import MemoryNetwork, MemoryPeer


async def _pair(leader_lineage: str, joiner_lineage: str, *, step: int = 5):
    net = MemoryNetwork()
    peers = [await MemoryPeer.create(net), await MemoryPeer.create(net)]
    peers.sort(key=lambda p: p.peer_id)                    # the smallest ID leads
    leader, joiner = [await Matchmaker.create(p, "run", gather_timeout_s=1.0) for p in peers]
    await leader.set_step(step, leader_lineage)
    await joiner.set_step(step, joiner_lineage)
    return leader, joiner


def _form(leader: Matchmaker, joiner: Matchmaker, step: int = 5):
    ids = [leader.peer.peer_id, joiner.peer.peer_id]
    return asyncio.gather(leader.form_group(step, ids, timeout_s=5.0), joiner.form_group(step, ids, timeout_s=5.0),
                          return_exceptions=True)


@pytest.mark.parametrize("lineages", [("a1", "a1"), ("a1", ""), ("", "b2")])
def test_peers_of_one_lineage_or_an_unknown_one_form_one_group(lineages):
    async def go():
        leader, joiner = await _pair(*lineages)
        (g1, _), (g2, _) = await _form(leader, joiner)
        assert g1 == g2 and g1.members == tuple(sorted([leader.peer.peer_id, joiner.peer.peer_id]))
    asyncio.run(go())


def test_a_joiner_with_another_lineage_at_the_leaders_step_must_download_the_leaders_model():
    async def go():
        leader, joiner = await _pair("a1", "b2")
        led, joined = await _form(leader, joiner)
        assert isinstance(joined, FellBehind) and joined.ahead == leader.peer.peer_id
        assert "another lineage" in str(joined)
        group, missing = led                                      # the leader goes on alone
        assert group.members == (leader.peer.peer_id,) and missing == {joiner.peer.peer_id}
        await joiner.set_step(5, "a1")                            # what downloading the leader's state gives
        await leader.abandon(5)
        (g1, _), (g2, _) = await _form(leader, joiner)
        assert g1 == g2 and len(g1.members) == 2
    asyncio.run(go())


def test_a_joiner_behind_the_leader_hears_ahead_whatever_its_lineage():
    async def go():
        leader, joiner = await _pair("a1", "b2")
        await leader.set_step(6, "a2")
        with pytest.raises(FellBehind, match="past step 5"):
            await joiner.form_group(5, [leader.peer.peer_id, joiner.peer.peer_id], timeout_s=5.0)
    asyncio.run(go())
