"""Block exchange over MemoryPeers (their side channels are real TCP on 127.0.0.1): parallel fetch,
bad providers, dead providers, fallback to libp2p streams, who is dialed, atomic output, pins."""

import asyncio
import logging
import random

import pytest

from swarmlm.errors import IntegrityError, NotFoundError
from swarmlm.p2p import keys
from swarmlm.p2p.channel.service import Endpoint
from swarmlm.p2p.identity import Identity
from swarmlm.p2p.memory import MemoryNetwork, MemoryPeer
from swarmlm.p2p.records import seal
from swarmlm.store import dag
from swarmlm.store import node as node_module
from swarmlm.store.exchange import BlockService
from swarmlm.store.fetch import FetchOptions, fetch_dag, get_file
from swarmlm.store.node import NodeOptions, StoreNode, pin_replicas
from swarmlm.store.providers import announce
from tests.helpers.sockets import CountingListener

CHUNK = 256 * 1024
N_CHUNKS = 10


class CorruptingService(BlockService):
    """A provider that flips a byte in every block it sends."""

    def _read_block(self, cid):
        data = super()._read_block(cid)
        return None if data is None else bytes([data[0] ^ 0xFF]) + data[1:]


class DyingService(BlockService):
    """A provider that vanishes (as if killed) after serving `limit` blocks."""

    def __init__(self, peer, store, network, limit):
        super().__init__(peer, store)
        self.network, self.limit = network, limit

    async def rpc_blocks(self, peer_id, request, **kw):
        async for chunk in super().rpc_blocks(peer_id, request, **kw):
            if self.served_blocks > self.limit:
                self.network.kill(self.peer.peer_id)
                return
            yield chunk


def _make_file(tmp_path, n_bytes=N_CHUNKS * CHUNK + 123, seed=0):
    path = tmp_path / f"file{seed}.bin"
    path.write_bytes(random.Random(seed).randbytes(n_bytes))          # distinct chunks: no dedup
    return path


async def _provider(net, tmp_path, name, path, service_cls=BlockService, **kw):
    peer = await MemoryPeer.create(net)
    store = dag.open_store(tmp_path / name)
    root = dag.add_file(store, path)
    service = service_cls(peer, store, **kw)
    await service.start()
    await announce(peer, str(root), size_bytes=path.stat().st_size, replicas=1, ttl_s=60)
    return peer, store, root, service


async def _accepted(peer) -> int:
    """Side-channel connections `peer` accepted so far."""
    return (await peer.side_channel()).accepted


def test_fetch_from_two_providers_returns_identical_bytes(tmp_path):
    async def go():
        net = MemoryNetwork()
        path = _make_file(tmp_path)
        a, _, root, _ = await _provider(net, tmp_path, "a", path)
        b, _, _, _ = await _provider(net, tmp_path, "b", path)
        c = await MemoryPeer.create(net)
        out = tmp_path / "out.bin"
        stats = await get_file(c, str(root), dag.open_store(tmp_path / "c"), out,
                               options=FetchOptions(batch=2))
        return path, out, stats, (a.peer_id, b.peer_id), (await _accepted(a), await _accepted(b))
    path, out, stats, ids, accepted = asyncio.run(go())
    assert out.read_bytes() == path.read_bytes()
    assert set(stats.blocks_by_peer) == set(ids)          # both providers served a share
    assert all(accepted) and stats.side_channel_blocks == stats.fetched_blocks   # over their side channels
    assert all(n <= 3 + 1 for n in accepted)              # a few connections, reused across batches


def test_bad_provider_is_banned_and_named_while_honest_one_completes(tmp_path, caplog):
    async def go():
        net = MemoryNetwork()
        path = _make_file(tmp_path)
        bad, _, root, _ = await _provider(net, tmp_path, "bad", path, CorruptingService)
        good, _, _, _ = await _provider(net, tmp_path, "good", path)
        c = await MemoryPeer.create(net)
        out = tmp_path / "out.bin"
        with caplog.at_level(logging.WARNING, logger="swarmlm"):
            stats = await get_file(c, str(root), dag.open_store(tmp_path / "c"), out, options=FetchOptions(batch=2))
        return path, out, stats, bad.peer_id, await _accepted(bad)
    path, out, stats, bad_id, bad_accepted = asyncio.run(go())
    assert out.read_bytes() == path.read_bytes()
    assert stats.banned == [bad_id] and bad_accepted > 0       # its bad blocks came over its side channel
    assert f"banning peer {bad_id}" in caplog.text


def test_only_a_bad_provider_means_integrity_error_and_no_output_file(tmp_path):
    async def go():
        net = MemoryNetwork()
        path = _make_file(tmp_path)
        _, _, root, _ = await _provider(net, tmp_path, "bad", path, CorruptingService)
        c = await MemoryPeer.create(net)
        await get_file(c, str(root), dag.open_store(tmp_path / "c"), tmp_path / "out" / "file.bin")
    (tmp_path / "out").mkdir()
    with pytest.raises(IntegrityError, match="corrupted"):
        asyncio.run(go())
    assert list((tmp_path / "out").iterdir()) == []


def test_no_provider_is_not_found(tmp_path):
    async def go():
        net = MemoryNetwork()
        store = dag.open_store(tmp_path / "a")
        root = dag.add_file(store, _make_file(tmp_path))
        c = await MemoryPeer.create(net)
        await fetch_dag(c, root, dag.open_store(tmp_path / "c"))
    with pytest.raises(NotFoundError):
        asyncio.run(go())


def test_provider_killed_mid_transfer_is_replaced_without_refetching(tmp_path):
    async def go():
        net = MemoryNetwork()
        path = _make_file(tmp_path)
        dying, _, root, _ = await _provider(net, tmp_path, "dying", path, DyingService, network=net, limit=4)
        c = await MemoryPeer.create(net)
        store_c = dag.open_store(tmp_path / "c")
        first = FetchOptions(batch=3, streams_per_provider=1)
        with pytest.raises(NotFoundError):                 # the only provider died: stop, keep what verified
            await fetch_dag(c, root, store_c, options=first)
        honest, _, _, _ = await _provider(net, tmp_path, "honest", path)
        second = await fetch_dag(c, root, store_c, options=first)
        assert await _accepted(honest) > 0
        return dying.peer_id, honest.peer_id, second
    dying_id, honest_id, second = asyncio.run(go())
    total = N_CHUNKS + 1 + 1                                  # leaves, the partial last chunk, the root
    assert second.already_local > 0
    assert second.already_local + second.fetched_blocks == total
    assert set(second.blocks_by_peer) == {honest_id}
    assert second.side_channel_blocks == second.fetched_blocks


def test_parallel_fetch_survives_a_provider_dying_and_fetches_each_block_once(tmp_path):
    async def go():
        net = MemoryNetwork()
        path = _make_file(tmp_path)
        dying, _, root, _ = await _provider(net, tmp_path, "dying", path, DyingService, network=net, limit=3)
        honest, _, _, _ = await _provider(net, tmp_path, "honest", path)
        c = await MemoryPeer.create(net)
        out = tmp_path / "out.bin"
        stats = await get_file(c, str(root), dag.open_store(tmp_path / "c"), out, options=FetchOptions(batch=2))
        return path, out, stats, dying.peer_id
    path, out, stats, dying_id = asyncio.run(go())
    assert out.read_bytes() == path.read_bytes()
    assert stats.fetched_blocks == N_CHUNKS + 2                # every block exactly once
    assert stats.side_channel_blocks == stats.fetched_blocks   # the dying one's too, until it died
    assert stats.blocks_by_peer.get(dying_id, 0) <= 3


@pytest.mark.parametrize("provider_side", ["corrupting", "honest"])
def test_a_fetcher_without_a_side_channel_gets_verified_blocks_over_libp2p(tmp_path, caplog, provider_side):
    """The provider offers no side channel (no endpoint announced): the fetch falls back to libp2p
    streams, and the blocks that come that way are checked against their CIDs as well."""
    async def go():
        net = MemoryNetwork()
        path = _make_file(tmp_path)
        if provider_side == "corrupting":
            await _provider(net, tmp_path, "bad", path, CorruptingService, side_channel=False)
        good, _, root, _ = await _provider(net, tmp_path, "good", path, side_channel=False)
        c = await MemoryPeer.create(net)
        out = tmp_path / "out.bin"
        with caplog.at_level(logging.INFO, logger="swarmlm"):
            stats = await get_file(c, str(root), dag.open_store(tmp_path / "c"), out, options=FetchOptions(batch=2))
        return path, out, stats
    path, out, stats = asyncio.run(go())
    assert out.read_bytes() == path.read_bytes()
    assert "no side channel" in caplog.text and "using libp2p streams" in caplog.text
    assert len(stats.banned) == (provider_side == "corrupting") and stats.side_channel_blocks == 0


@pytest.mark.parametrize("endpoint", ["host name", "forged by another peer"])
def test_a_provider_is_dialed_only_at_an_ip_it_announced_itself(tmp_path, endpoint):
    """The provider serves blocks over its side channel, but the endpoint record the fetcher finds
    names a host, or was signed by another peer: nothing is dialed (a listener on the record's
    port counts no connection), and the blocks still come, over libp2p."""
    async def go():
        net = MemoryNetwork()
        trap = CountingListener()
        path = _make_file(tmp_path)
        prov, _, root, _ = await _provider(net, tmp_path, "p", path)
        key, subkey = keys.endpoint_key(prov.peer_id), keys.peer_subkey(prov.peer_id)
        assert net.table[key].pop(subkey)                       # its genuine endpoint, gone
        if endpoint == "host name":      # the provider's own, signed record: still no DNS on its word
            await prov.store(key, Endpoint([f"/dns4/localhost/tcp/{trap.port}", f"/ip4/localhost/tcp/{trap.port}"]),
                             ttl_s=600, subkey=subkey)
        else:
            mallory = Identity.generate()
            forged = seal(mallory, key, Endpoint([f"/ip4/127.0.0.1/tcp/{trap.port}"]), expires_at=2e9,
                          subkey=keys.peer_subkey(mallory.peer_id))
            assert net._store(key, keys.peer_subkey(mallory.peer_id), forged, 2e9)
        assert net.table[key]                                   # a record is there to be found
        c = await MemoryPeer.create(net)
        out = tmp_path / "out.bin"
        stats = await get_file(c, str(root), dag.open_store(tmp_path / "c"), out, options=FetchOptions(batch=2))
        return path, out, stats, trap.accepted(), prov.peer_id, await _accepted(prov)
    path, out, stats, dialed, prov_id, accepted = asyncio.run(go())
    assert dialed == 0 and accepted == 0 and stats.side_channel_blocks == 0
    assert out.read_bytes() == path.read_bytes() and set(stats.blocks_by_peer) == {prov_id}


def test_pin_replicas_copies_to_another_node_and_re_replicates_when_a_holder_leaves(tmp_path):
    async def go():
        net = MemoryNetwork()
        path = _make_file(tmp_path)
        nodes = []
        for i in range(3):
            peer = await MemoryPeer.create(net)
            store = dag.open_store(tmp_path / f"n{i}")
            node = StoreNode(peer, store, NodeOptions(announce_interval_s=3600, replication_interval_s=3600))
            await node.start()
            nodes.append(node)
        root = dag.add_file(nodes[0].store, path)
        dag.pin(nodes[0].store, root)
        await nodes[0].announce_all()
        client = await MemoryPeer.create(net, client_mode=True)
        holders = await pin_replicas(client, str(root), 2, timeout_s=30)
        assert len(holders) == 2 and nodes[0].peer.peer_id in holders
        second = next(n for n in nodes if n.peer.peer_id in holders and n is not nodes[0])
        third = next(n for n in nodes if n.peer.peer_id not in holders)
        await second.announce_all()
        await nodes[0].close()
        net.kill(nodes[0].peer.peer_id)
        asked = await second.check_replication()
        for n in nodes:
            await n.close()
        return asked, third, root
    asked, third, root = asyncio.run(go())
    assert asked == [third.peer.peer_id]
    assert str(root) in {str(r) for r in dag.pinned_roots(third.store)}


def test_pin_replicas_passes_calmly_over_peers_that_store_nothing(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="swarmlm.store.node")

    async def go():
        net = MemoryNetwork()
        nodes = []
        for i in range(2):
            node = StoreNode(await MemoryPeer.create(net), dag.open_store(tmp_path / f"n{i}"),
                             NodeOptions(announce_interval_s=3600, replication_interval_s=3600))
            await node.start()
            nodes.append(node)
        bystanders = [(await MemoryPeer.create(net)).peer_id for _ in range(3)]     # no store, no pin handler
        monkeypatch.setattr(node_module, "rendezvous_rank",                           # ask them first
                            lambda root, peers: sorted(peers, key=lambda p: p not in bystanders))
        root = dag.add_file(nodes[0].store, _make_file(tmp_path))
        dag.pin(nodes[0].store, root)
        await nodes[0].announce_all()
        holders = await pin_replicas(await MemoryPeer.create(net, client_mode=True), str(root), 2, timeout_s=30)
        for n in nodes:
            await n.close()
        return holders, [n.peer.peer_id for n in nodes], bystanders
    holders, node_ids, bystanders = asyncio.run(go())

    assert sorted(holders) == sorted(node_ids)
    calm = [r for r in caplog.records if "does not store blocks" in r.getMessage()]
    assert {b for b in bystanders if any(b in r.getMessage() for r in calm)} == set(bystanders)
    assert all(r.levelno == logging.INFO for r in calm)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
