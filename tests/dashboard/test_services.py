"""The dashboard's panels for the services beside inference, from records in an in-memory DHT: servers'
quantization, version and served tokens/s; federated runs (a real coordinator's announcements, forged
records ignored); MPC parties per model; the ledger (an in-process chain), and its CLI flags' errors."""

import asyncio
import json
import os

import pytest

from swarmlm.dashboard.collect import Collector
from swarmlm.dashboard.panels import FederatedPanel, ModelsPanel, MpcPanel, default_panels
from swarmlm.dashboard.view import ServedRate
from swarmlm.p2p import keys
from swarmlm.p2p.directory import publish_entry
from swarmlm.p2p.memory import MemoryNetwork, MemoryPeer
from swarmlm.privacy.coordinator import RUNS_SERVICE, RunRecord
from swarmlm.privacy.mpc.party import PartyOptions, PartyServer
from swarmlm.swarm.dht import MODELS_SERVICE, ServerRecord, store_record
from tests.helpers.swarm import run_cli


def server(tokens: int = 0, quantization: str = "none", version: str = "9.9.9") -> ServerRecord:
    return ServerRecord(model="m", start=0, end=2, state="online", dtype="float32", block_tokens_per_s=100.0,
                        free_cache_tokens=1000, sessions=0, quantization=quantization, version=version,
                        tokens_served=tokens)


# ---- servers: quantization, version, served tokens/s ----------------------------------------------

def test_served_rate_is_the_counters_rise_between_announcements():
    rate = ServedRate()
    k = ("m", "p")
    assert rate.observe(k, 100, 1000.0) is None                  # one announcement: no rate yet
    assert rate.observe(k, 100, 1000.0) is None                  # the same one seen again
    assert rate.observe(k, 600, 1010.0) == pytest.approx(50.0)
    assert rate.observe(k, 600, 1010.0) == pytest.approx(50.0)   # kept until the next announcement
    assert rate.observe(k, 600, 1020.0) == pytest.approx(0.0)    # idle
    assert rate.observe(k, 5, 1030.0) is None                    # restarted: the counter fell
    rate.forget_except([])
    assert rate.last == {} and rate.rate == {}


def test_servers_show_quantization_version_and_served_tokens_per_s():
    async def go():
        net = MemoryNetwork()
        a, b = await MemoryPeer.create(net), await MemoryPeer.create(net)
        for p in (a, b):
            await publish_entry(p, MODELS_SERVICE, "m", ttl_s=30, size=4)
        await store_record(a, server(tokens=0, quantization="int8"), ttl_s=30)
        await store_record(b, dataclasses_replace(server(tokens=0), start=2, end=4), ttl_s=30)
        collector = Collector(await MemoryPeer.create(net, client_mode=True), [ModelsPanel()])
        first = await collector.refresh()
        await store_record(a, server(tokens=1000, quantization="int8"), ttl_s=40)   # expires 10 s later
        await store_record(b, dataclasses_replace(server(tokens=1000), start=2, end=4), ttl_s=40)
        return first, await collector.refresh(), a.peer_id

    first, later, a_id = asyncio.run(go())
    rows = {r["peer_id"]: r for r in first["servers"]}
    assert rows[a_id]["quantization"] == "int8" and rows[a_id]["version"] == "9.9.9"
    assert all(r["served_tokens_per_s"] is None for r in rows.values())
    rows = {r["peer_id"]: r for r in later["servers"]}
    assert all(r["served_tokens_per_s"] == pytest.approx(100.0, rel=0.05) for r in rows.values())
    # each token runs through every block once: the model served 100 tokens/s, not 200
    assert later["models"][0]["served_tokens_per_s"] == pytest.approx(100.0, rel=0.05)
    json.dumps(later, allow_nan=False)


def dataclasses_replace(record, **kw):
    import dataclasses
    return dataclasses.replace(record, **kw)


def test_a_real_server_announces_its_version_and_counts_tokens():
    import torch

    from swarmlm import __version__
    from swarmlm.model.config import PRESETS
    from swarmlm.model.transformer import Transformer
    from swarmlm.swarm import wire
    from swarmlm.swarm.server.host import BlockHost

    torch.manual_seed(0)
    cfg = PRESETS["tiny"]
    host = BlockHost(Transformer(cfg).requires_grad_(False), model_id="m")

    async def go():
        sid = os.urandom(wire.SESSION_ID_BYTES)
        await host.rpc_open("c", wire.OpenRequest(session_id=sid, start=host.start, end=host.end, batch=1,
                                                  max_length=16))
        await host.rpc_step("c", wire.StepRequest(session_id=sid, start=host.start, end=host.end, position=0,
                                                  hidden=torch.randn(1, 5, cfg.dim)))
        return host.record()

    try:
        record = asyncio.run(go())
    finally:
        host.close()
    assert record.version == __version__ and record.tokens_served == 5
    record.check()


# ---- federated runs -------------------------------------------------------------------------------

def test_federated_panel_follows_a_real_coordinators_rounds_with_dp(tmp_path):
    from tests.privacy.test_coordinator import client, make_coordinator

    async def main():
        net = MemoryNetwork()
        coord = await make_coordinator(net, tmp_path, rounds=2, clients_per_round=2, min_clients=2,
                                       dp_clip=1.0, dp_noise=1.0)
        collector = Collector(await MemoryPeer.create(net, client_mode=True), [FederatedPanel()])
        peers = [await MemoryPeer.create(net) for _ in range(2)]
        tasks = [asyncio.create_task(client(p, value=0.5).run()) for p in peers]
        before = await collector.refresh()
        await asyncio.wait_for(coord.run(start_clients=2), 30)
        await asyncio.gather(*tasks, return_exceptions=True)
        return before, await collector.refresh()

    before, after = asyncio.run(main())
    assert before["fl_runs"] == []                # announced under the key, but not listed yet: nothing shown
    [run] = after["fl_runs"]
    assert run["run_id"] == "t" and run["done"] == 2 and run["rounds"] == 2 and run["clients"] == 2
    assert run["dropped"] == 0 and run["train_loss"] == pytest.approx(1.0) and run["val_loss"] == pytest.approx(1.0)
    assert run["dp"] and run["epsilon"] > 0 and run["delta"] > 0
    assert run["history"] == [[2, pytest.approx(1.0)]]
    json.dumps(after, allow_nan=False)


def test_federated_panel_plots_rounds_and_ignores_forged_records():
    async def main():
        net = MemoryNetwork()
        coord, forger = await MemoryPeer.create(net), await MemoryPeer.create(net)
        await publish_entry(coord, RUNS_SERVICE, "r", ttl_s=60, size=5)
        collector = Collector(await MemoryPeer.create(net, client_mode=True), default_panels())
        seen = []
        for done, loss in ((1, 3.0), (2, 2.5)):
            await coord.store(keys.fl_run_key("r"), RunRecord(done, "cid", False, rounds=5, done=done, clients=3,
                                                              train_loss=loss, val_loss=loss, has_loss=True),
                              ttl_s=60, subkey=keys.peer_subkey(coord.peer_id))
            seen.append(await collector.refresh())
        # a peer that did not list the run claims a later round with a better loss: not believed
        await forger.store(keys.fl_run_key("r"), RunRecord(9, "evil", False, rounds=5, done=9, clients=99,
                                                           train_loss=0.1, val_loss=0.1, has_loss=True),
                           ttl_s=60, subkey=keys.peer_subkey(forger.peer_id))
        seen.append(await collector.refresh())
        return seen, coord.peer_id

    seen, coord_id = asyncio.run(main())
    run = seen[-1]["fl_runs"][0]
    assert run["coordinator"] == coord_id and run["done"] == 2 and run["clients"] == 3
    assert run["history"] == [[1, 3.0], [2, 2.5]]
    assert not run["dp"] and run["epsilon"] is None and run["sample_epsilon"] is None


def test_a_run_record_with_nonsense_is_refused():
    with pytest.raises(ValueError):
        RunRecord(0, "c", False, clients=-1).check()
    with pytest.raises(ValueError):
        RunRecord(0, "c", False, train_loss=float("nan")).check()


# ---- MPC parties ----------------------------------------------------------------------------------

def test_mpc_panel_lists_parties_per_model_and_whether_three_are_there():
    async def main():
        net = MemoryNetwork()
        collector = Collector(await MemoryPeer.create(net, client_mode=True), [MpcPanel()])
        parties = []
        for i in range(3):
            peer = await MemoryPeer.create(net)
            party = PartyServer(peer, None, None, "model-x", PartyOptions(model="x", max_tokens=64 + i))
            assert await party.announce()
            parties.append(peer.peer_id)
            if i == 1:
                two = await collector.refresh()
        return two, await collector.refresh(), parties

    two, three, parties = asyncio.run(main())
    [m] = two["mpc"]
    assert m["model"] == "model-x" and len(m["parties"]) == 2 and not m["ready"]
    [m] = three["mpc"]
    assert sorted(p["peer_id"] for p in m["parties"]) == sorted(parties) and m["ready"]
    assert {p["max_tokens"] for p in m["parties"]} == {64, 65, 66}


# ---- the ledger -----------------------------------------------------------------------------------

def test_ledger_panel_shows_the_epoch_and_each_accounts_credit_and_quota():
    from web3 import EthereumTesterProvider, Web3

    from swarmlm.dashboard.ledger_panel import LedgerPanel
    from swarmlm.ledger import chain
    from swarmlm.ledger.keys import sign_binding
    from swarmlm.p2p.identity import Identity

    w3 = Web3(EthereumTesterProvider())
    key_list = [bytes(31) + bytes([i]) for i in range(1, 4)]
    address = chain.deploy(w3, key_list[0], chain.LedgerParams(epoch_seconds=1000, free_tokens=50))
    ids = []
    for i, key in enumerate(key_list[1:]):
        c = chain.LedgerClient(w3, address, key)
        identity = Identity.generate()
        peer_key, sig = sign_binding(identity, c.chain_id, c.address, c.account)
        c.transact("register", peer_key, sig, i == 0)
        ids.append((c.account, identity.peer_id, i == 0))
    panel = LedgerPanel(chain.LedgerClient(w3, address, os.urandom(32)), every_s=0.0)
    data = asyncio.run(panel.collect(None, 0.0))["ledger"]
    assert data["address"] == chain.LedgerClient(w3, address, key_list[0]).address
    assert data["epoch"] >= 0 and data["epoch_seconds"] == 1000 and data["free_tokens"] == 50
    rows = {a["account"]: a for a in data["accounts"]}
    for account, peer_id, is_server in ids:
        assert rows[account]["peer_id"] == peer_id and rows[account]["server"] == is_server
        assert rows[account]["quota"] == 50 and rows[account]["quota_left"] == 50 and rows[account]["credit"] == 0
    json.dumps(data, allow_nan=False)


def test_dashboard_ledger_flags_go_together_and_a_bad_chain_is_one_line():
    from swarmlm.p2p.identity import Identity

    maddr = f"/ip4/127.0.0.1/tcp/1/p2p/{Identity.generate().peer_id}"
    done = run_cli("dashboard", "--initial-peers", maddr, "--ledger", "0x" + "1" * 40, timeout_s=60)
    assert done.returncode == 2 and "--ledger ADDRESS and --chain-rpc URL go together" in done.stderr
    done = run_cli("dashboard", "--initial-peers", maddr, "--ledger", "0x" + "1" * 40,
                   "--chain-rpc", "http://127.0.0.1:9", timeout_s=60)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
