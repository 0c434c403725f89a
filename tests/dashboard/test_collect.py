"""The collector's snapshot from records in an in-memory DHT: servers, holes, staleness, runs, store,
and what it does with lies (an absurd model size, a NaN loss, a failing panel)."""

import asyncio
import json
import math
import time

import pytest

from swarmlm.collab.progress import RUNS_SERVICE, ProgressRecord
from swarmlm.dashboard.collect import Collector
from swarmlm.dashboard.panels import MAX_LAYERS, default_panels
from swarmlm.errors import PeerError
from swarmlm.p2p import keys
from swarmlm.p2p.directory import publish_entry
from swarmlm.p2p.memory import MemoryNetwork, MemoryPeer
from swarmlm.store.providers import ROOTS_SERVICE, announce
from swarmlm.swarm.dht import ServerRecord
from swarmlm.swarm.server.announce import Announcer


def server(model: str, start: int, end: int, state: str = "online", tps: float = 100.0) -> ServerRecord:
    return ServerRecord(model=model, start=start, end=end, state=state, dtype="float32", block_tokens_per_s=tps,
                        free_cache_tokens=1000, sessions=1)


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def _swarm(net: MemoryNetwork, specs) -> list[MemoryPeer]:
    peers = []
    for record in specs:
        peer = await MemoryPeer.create(net)
        await Announcer(peer, lambda r=record: r, ttl_s=30, n_layers=4).announce()
        peers.append(peer)
    return peers


def test_servers_coverage_and_holes():
    async def go():
        net = MemoryNetwork()
        servers = await _swarm(net, [server("m", 0, 2), server("m", 1, 3, tps=50.0), server("m", 3, 4, "joining")])
        collector = Collector(await MemoryPeer.create(net, client_mode=True), default_panels())
        return await collector.refresh(), servers

    snap, servers = asyncio.run(go())
    [model] = snap["models"]
    assert model["coverage"] == [1, 2, 1, 0] and model["holes"] == [[3, 4]]
    assert model["block_throughput"] == [100.0, 150.0, 50.0, 0.0] and model["throughput"] == 0.0
    assert model["sessions"] == 3
    rows = {r["peer_id"]: r for r in snap["servers"]}
    assert {pid: (tuple(r["blocks"]), r["state"]) for pid, r in rows.items()} == {
        servers[0].peer_id: ((0, 2), "online"), servers[1].peer_id: ((1, 3), "online"),
        servers[2].peer_id: ((3, 4), "joining")}
    json.dumps(snap, allow_nan=False)            # what /api/swarm and the stream send


def test_a_server_that_stops_refreshing_turns_offline_and_opens_a_hole():
    async def go():
        net = MemoryNetwork()
        await _swarm(net, [server("m", 0, 2), server("m", 2, 4)])
        clock = Clock()
        collector = Collector(await MemoryPeer.create(net, client_mode=True), default_panels(), clock=clock)
        first = await collector.refresh()
        clock.now += 17.5                      # ttl 30: stale after 15 s + 2 s without a refresh
        return first, await collector.refresh()

    first, later = asyncio.run(go())
    assert first["models"][0]["holes"] == []
    assert {r["state"] for r in later["servers"]} == {"offline"} and all(r["stale"] for r in later["servers"])
    assert later["models"][0]["holes"] == [[0, 4]]


def test_a_model_listed_with_absurdly_many_blocks_is_ignored():
    async def go():
        net = MemoryNetwork()
        liar = await MemoryPeer.create(net)
        await publish_entry(liar, "swarm.models", "huge", ttl_s=30, size=MAX_LAYERS + 1)
        return await Collector(await MemoryPeer.create(net, client_mode=True), default_panels()).refresh()

    assert asyncio.run(go())["models"] == []


def test_runs_report_live_peers_and_grow_a_loss_history():
    async def go():
        net = MemoryNetwork()
        a, b, gone = [await MemoryPeer.create(net) for _ in range(3)]
        key = keys.collab_progress_key("r")
        collector = Collector(await MemoryPeer.create(net, client_mode=True), default_panels())
        snaps = []
        for step, (la, lb) in enumerate([(2.0, math.nan), (1.5, 1.7)]):
            for peer, loss in ((a, la), (b, lb)):
                await peer.store(key, ProgressRecord(step=step, samples=0, samples_per_s=2.0, loss=loss,
                                                     time=time.time()), ttl_s=30, subkey=peer.peer_id)
                await publish_entry(peer, RUNS_SERVICE, "r", ttl_s=30)
            await gone.store(key, ProgressRecord(step=9, samples=0, samples_per_s=5.0, loss=0.1, time=time.time(),
                                                 active=False), ttl_s=30, subkey=gone.peer_id)
            snaps.append(await collector.refresh())
        return snaps

    first, second = asyncio.run(go())
    [run] = second["runs"]
    assert run["run_id"] == "r" and len(run["peers"]) == 2           # the inactive peer is not counted
    assert run["global_step"] == 1 and run["samples_per_s"] == 4.0 and run["loss"] == pytest.approx(1.6)
    assert run["history"] == [[0, 2.0], [1, pytest.approx(1.6)]]
    assert first["runs"][0]["peers"][0]["loss"] in (2.0, None)
    json.dumps(first, allow_nan=False)


def test_store_roots_with_holders_and_replicas():
    async def go():
        net = MemoryNetwork()
        a, b = await MemoryPeer.create(net), await MemoryPeer.create(net)
        for peer in (a, b):
            await announce(peer, "bafyroot", size_bytes=10, replicas=3, ttl_s=30)
            await publish_entry(peer, ROOTS_SERVICE, "bafyroot", ttl_s=30, size=10)
        return await Collector(await MemoryPeer.create(net, client_mode=True), default_panels()).refresh(), a, b

    snap, a, b = asyncio.run(go())
    [root] = snap["store"]["roots"]
    assert root == {"cid": "bafyroot", "size_bytes": 10, "holders": sorted([a.peer_id, b.peer_id]), "replicas": 2,
                    "target": 3}
    assert len(snap["store"]["peers"]) == 2


class Failing:
    name = "broken"

    async def collect(self, peer, now):
        raise PeerError("the DHT did not answer")


class Buggy:
    name = "buggy"

    async def collect(self, peer, now):
        return {}["missing"]


class Fixed:
    name = "fixed"

    async def collect(self, peer, now):
        return {"fixed": [{"a": 1}]}


def test_a_failing_panel_keeps_the_others_and_reports_its_error():
    async def go():
        collector = Collector(await MemoryPeer.create(MemoryNetwork(), client_mode=True), [Failing(), Buggy(), Fixed()])
        stream = collector.updates()
        first = await stream.__anext__()
        refreshed = await collector.refresh()
        return first, refreshed, await stream.__anext__()

    first, snap, streamed = asyncio.run(go())
    assert first["version"] == 0 and streamed["version"] == 1
    assert snap["fixed"] == [{"a": 1}] and snap["errors"] == {"broken": "the DHT did not answer", "buggy": "'missing'"}
    assert snap["panels"] == ["broken", "buggy", "fixed"]
