"""The federated roles' and MPC parties' Prometheus metrics: the coordinator and its clients count rounds,
round times, dropped clients and bytes (in process, over in-memory peers), and `fl coordinate` / `fl join`
serve them on `--metrics-port`, moving as a client joins (real processes). The MPC party's are in
test_mpc_swarm.py, beside its private generations."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY

from swarmlm.p2p.memory import MemoryNetwork, MemoryPeer
from swarmlm.p2p.process import start_child
from tests.helpers.metrics import metrics_url, scrape
from tests.helpers.swarm import STARTUP_TIMEOUT_S, poll_until, stop_all, swarmlm_command
from tests.privacy.test_coordinator import client, make_coordinator

NAMES = ("swarmlm_fl_rounds_total", "swarmlm_fl_round_seconds_count", "swarmlm_fl_dropped_clients_total",
         "swarmlm_fl_sent_bytes_total", "swarmlm_fl_received_bytes_total", "swarmlm_fl_round_failures_total",
         "swarmlm_fl_client_rounds_total", "swarmlm_fl_client_sent_bytes_total",
         "swarmlm_fl_client_received_bytes_total", "swarmlm_fl_client_round_seconds_count")


def values() -> dict[str, float]:
    return {n: REGISTRY.get_sample_value(n) or 0.0 for n in NAMES}


def test_a_coordinator_and_its_clients_count_rounds_drops_and_bytes(tmp_path):
    async def main():
        net = MemoryNetwork()
        coord = await make_coordinator(net, tmp_path, rounds=2, clients_per_round=3, min_clients=2)
        peers = [await MemoryPeer.create(net) for _ in range(3)]
        tasks = [asyncio.create_task(client(peers[0], value=1.0).run()),
                 asyncio.create_task(client(peers[1], value=2.0).run()),
                 asyncio.create_task(client(peers[2], value=3.0, leave_in_round=1).run())]
        await asyncio.wait_for(coord.run(start_clients=3), 30)
        await asyncio.gather(*tasks, return_exceptions=True)

    before = values()
    asyncio.run(main())
    moved = {n: values()[n] - before[n] for n in NAMES}
    assert moved["swarmlm_fl_rounds_total"] == 2 and moved["swarmlm_fl_round_seconds_count"] == 2
    assert moved["swarmlm_fl_dropped_clients_total"] == 1          # the one that left as round 2 began
    assert moved["swarmlm_fl_round_failures_total"] == 0
    assert moved["swarmlm_fl_client_rounds_total"] == 5 and moved["swarmlm_fl_client_round_seconds_count"] == 5
    # every byte one side wrote, the other read (JOIN, WELCOME, rounds, reports, updates, END)
    assert moved["swarmlm_fl_received_bytes_total"] > 2 * 2 * 4 * 1000       # two updates of 1,000 floats a round
    assert moved["swarmlm_fl_client_sent_bytes_total"] >= moved["swarmlm_fl_received_bytes_total"]
    assert moved["swarmlm_fl_client_received_bytes_total"] > 0 and moved["swarmlm_fl_sent_bytes_total"] > 0
    assert REGISTRY.get_sample_value("swarmlm_fl_round_clients") == 2
    assert REGISTRY.get_sample_value("swarmlm_fl_clients_connected") == 0      # all gone once the run ended


@pytest.mark.slow
def test_fl_coordinate_and_join_serve_metrics_that_move_as_a_client_joins(tmp_path):
    from tests.privacy.fl_setup import build_model, write_shards

    model, shards = build_model(tmp_path / "model"), write_shards(tmp_path / "data")
    procs = []
    try:
        coord = start_child(swarmlm_command(["fl", "coordinate", model, "--run-id", "m", "--out", tmp_path / "out",
                                             "--data-dir", tmp_path / "coord", "--host", "127.0.0.1", "--rounds", "1",
                                             "--clients-per-round", "2", "--min-clients", "2",
                                             "--metrics-port", "0"]),
                            log_path=tmp_path / "coord.log", timeout_s=STARTUP_TIMEOUT_S)
        procs.append(coord)
        coord_url = metrics_url(coord)
        before = scrape(coord_url)
        assert before["swarmlm_fl_clients_connected"] == 0 and before["swarmlm_fl_rounds_total"] == 0
        joiner = start_child(swarmlm_command(["fl", "join", "--run-id", "m", "--initial-peers", coord.maddrs[0],
                                              "--data", shards[0], "--data-dir", tmp_path / "client",
                                              "--host", "127.0.0.1", "--metrics-port", "0"]),
                             log_path=tmp_path / "client.log", wait=False)
        procs.append(joiner)
        # one client of the two needed: it joins, and the coordinator waits for the second
        assert poll_until(lambda: scrape(coord_url)["swarmlm_fl_clients_connected"] == 1, 90), coord.log_tail()
        after = scrape(coord_url)
        assert after["swarmlm_fl_received_bytes_total"] > 0 and after["swarmlm_fl_sent_bytes_total"] > 0
        client_metrics = scrape(metrics_url(joiner))
        assert client_metrics["swarmlm_fl_client_sent_bytes_total"] > 0
        assert client_metrics["swarmlm_fl_client_received_bytes_total"] > 0
    finally:
        stop_all(procs)
