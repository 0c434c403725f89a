"""The averaging round over MemoryPeers: results, malformed updates, peers dying mid-round."""

import asyncio

import pytest
import torch

from swarmlm import serialize
from swarmlm.collab.allreduce import AllReduce
from swarmlm.collab.matchmaking import Group, Matchmaker
from swarmlm.collab.parts import part_bounds
from swarmlm.collab.streams import PartRequest, call_part
from swarmlm.errors import RoundFailed
from swarmlm.p2p.memory import MemoryNetwork, MemoryPeer


async def _peers(n, max_part_elems=64, **kw):
    net = MemoryNetwork()
    peers = [await MemoryPeer.create(net) for _ in range(n)]
    reducers = [await AllReduce.create(p, max_part_elems=max_part_elems, **kw) for p in peers]
    return net, peers, reducers


def _group(peers, step=0, gid=b"g" * 16):
    members = tuple(sorted(p.peer_id for p in peers))
    return Group(gid, step, members, members[0])


@pytest.mark.parametrize("codec", ["none", "fp16", "int8"])
def test_round_averages_and_every_member_gets_identical_values(codec):
    async def main():
        _, peers, reducers = await _peers(3, compression=codec)
        vecs = [torch.randn(1000) for _ in peers]
        group = _group(peers)
        results = await asyncio.gather(*(r.run(group, v, weight=1.0, timeout_s=5) for r, v in zip(reducers, vecs)))
        return vecs, results
    vecs, results = asyncio.run(main())
    expected = torch.stack(vecs).mean(0)
    tol = {"none": 1e-6, "fp16": 2e-3, "int8": 3e-2}[codec]
    for res in results:
        assert torch.equal(res.vector, results[0].vector)
        assert (res.vector - expected).abs().max() < tol * 4
        assert res.total_weight == 3.0


def test_mean_is_weighted_by_sample_counts():
    async def main():
        _, peers, reducers = await _peers(2)
        group = _group(peers)
        vecs = [torch.ones(100), torch.zeros(100)]
        return await asyncio.gather(*(r.run(group, v, weight=w, timeout_s=5)
                                      for r, v, w in zip(reducers, vecs, [3.0, 1.0])))
    results = asyncio.run(main())
    assert torch.allclose(results[0].vector, torch.full((100,), 0.75))


def test_round_completes_when_a_member_sends_malformed_tensors():
    """The malformed member's updates are dropped with a reason; the honest ones are averaged."""
    async def main():
        _, peers, reducers = await _peers(3)
        group = _group(peers)
        bad = group.members[2]
        bad_peer = next(p for p in peers if p.peer_id == bad)
        honest = [(r, p) for r, p in zip(reducers, peers) if p.peer_id != bad]
        vecs = {p.peer_id: torch.randn(300) for _, p in honest}
        bounds = part_bounds(300, 3, 64)
        junk = [torch.zeros(7), torch.zeros(100, dtype=torch.float64), torch.full((100,), float("nan"))]

        async def saboteur():
            replies = []
            for part, (a, b) in enumerate(bounds):
                owner = group.members[part % 3]
                if owner == bad:
                    continue
                t = junk[part % 3]
                t = t if t.numel() != 100 or t.dtype != torch.float32 else torch.full((b - a,), float("nan"))
                req = PartRequest(group.group_id, part, 1.0, serialize.tensor_to_bytes(t))
                replies.append(call_part(bad_peer, owner, serialize.encode_message(req), timeout_s=5))
            await asyncio.gather(*replies, return_exceptions=True)

        # the saboteur owns parts too: let it answer with an honest mean so the round can finish
        bad_reducer = next(r for r, p in zip(reducers, peers) if p.peer_id == bad)
        bad_run = bad_reducer.run(group, torch.full((300,), float("nan")), weight=1.0, timeout_s=5)
        results = await asyncio.gather(*(r.run(group, vecs[p.peer_id], weight=1.0, timeout_s=5)
                                         for r, p in honest), bad_run, return_exceptions=True)
        return vecs, results, bad
    vecs, results, bad = asyncio.run(main())
    expected = torch.stack(list(vecs.values())).mean(0)
    for res in results[:2]:
        assert not isinstance(res, BaseException), res
        assert torch.allclose(res.vector, expected, atol=1e-6)
        assert res.dropped and all(sender == bad for sender, _, _ in res.dropped)


def _die_on_first_part(reducer, event):
    """From the moment a part from another member reaches `reducer`, it takes nothing in (it is
    dying): none of its parts completes, so it answers none, and `event` is set."""
    start = reducer.rounds.start

    def start_dying(rnd):
        def contribute(part, sender, contribution):
            event.set()
        rnd.contribute = contribute
        start(rnd)
    reducer.rounds.start = start_dying


@pytest.mark.parametrize("transport", ["auto", "libp2p"])
def test_peer_killed_mid_round_never_leaves_a_partial_average_as_success(transport):
    """Member C dies when the first part from another member reaches it: A and B raise
    RoundFailed naming it, their inputs untouched, then redo the round over the two of them and
    end with exactly their mean."""
    async def main():
        net, peers, reducers = await _peers(3, transport=transport)
        group = _group(peers)
        by_id = dict(zip((p.peer_id for p in peers), reducers))
        victim = group.members[1]
        survivors = [m for m in group.members if m != victim]
        vecs = {m: torch.randn(1000) for m in group.members}
        originals = {m: v.clone() for m, v in vecs.items()}
        first_part_in = asyncio.Event()
        _die_on_first_part(by_id[victim], first_part_in)
        runs = {m: asyncio.ensure_future(by_id[m].run(group, vecs[m], weight=1.0, timeout_s=3))
                for m in group.members}
        await asyncio.wait_for(first_part_in.wait(), 3)
        assert not any(runs[m].done() for m in survivors)
        net.kill(victim)
        runs[victim].cancel()
        await by_id[victim].close()
        first = await asyncio.gather(*(runs[m] for m in survivors), return_exceptions=True)
        retry_group = Group(b"r" * 16, 0, tuple(survivors), survivors[0])
        second = await asyncio.gather(*(by_id[m].run(retry_group, vecs[m], weight=1.0, timeout_s=3)
                                        for m in survivors))
        return first, second, vecs, originals, survivors, victim
    first, second, vecs, originals, survivors, victim = asyncio.run(main())
    for res in first:
        assert isinstance(res, RoundFailed), res
    assert any(victim in res.suspects for res in first)
    for m in survivors:
        assert torch.equal(vecs[m], originals[m])             # the input is never touched
    expected = (vecs[survivors[0]] + vecs[survivors[1]]) / 2
    for res in second:
        assert torch.allclose(res.vector, expected, atol=1e-6)


def test_frozen_member_fails_the_round_within_the_timeout():
    async def main():
        _, peers, reducers = await _peers(3)
        group = _group(peers)
        # the third member never starts its round
        runs = [r.run(group, torch.randn(200), weight=1.0, timeout_s=0.5) for r in reducers[:2]]
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        results = await asyncio.gather(*runs, return_exceptions=True)
        return results, loop.time() - t0
    results, elapsed = asyncio.run(main())
    assert all(isinstance(r, RoundFailed) for r in results)
    assert elapsed < 5


def test_matchmaking_forms_one_group_with_the_same_members():
    async def main():
        _, peers, _ = await _peers(3)
        mms = [await Matchmaker.create(p, "run", gather_timeout_s=2.0) for p in peers]
        ids = sorted(p.peer_id for p in peers)
        return await asyncio.gather(*(mm.form_group(0, ids, timeout_s=5) for mm in mms)), ids
    results, ids = asyncio.run(main())
    groups = [g for g, _ in results]
    assert all(g == groups[0] for g in groups) and groups[0].members == tuple(ids)


def test_matchmaking_skips_a_dead_leader():
    async def main():
        net, peers, _ = await _peers(3)
        mms = [await Matchmaker.create(p, "run", gather_timeout_s=0.5) for p in peers]
        ids = sorted(p.peer_id for p in peers)
        dead = ids[0]
        net.kill(dead)
        alive = [mm for mm, p in zip(mms, peers) if p.peer_id != dead]
        return await asyncio.gather(*(mm.form_group(0, ids, timeout_s=5) for mm in alive)), ids
    results, ids = asyncio.run(main())
    groups = [g for g, _ in results]
    assert groups[0] == groups[1] and groups[0].members == tuple(ids[1:])
    assert ids[0] in results[0][1] | results[1][1]
