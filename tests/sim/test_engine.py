"""The simulation: exact small cases, determinism, that it makes the services' own decisions, failover,
churn, balancing against random placement, training; the command's JSON."""

import dataclasses
import json
from pathlib import Path

import pytest

from swarmlm.collab import progress
from swarmlm.sim import engine
from swarmlm.sim.run import simulate_scenario
from swarmlm.sim.scenario import (ChurnSpec, ClientSpec, ModelSpec, NetworkSpec, Scenario, ServerSpec, TrainingSpec,
                                  const, load_scenario)
from swarmlm.swarm.client import hops, routing
from swarmlm.swarm.server import selection
from tests.helpers.swarm import run_cli

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"


def two_servers(**network) -> Scenario:
    return Scenario(duration_s=10, model=ModelSpec(n_layers=4, hidden_bytes=256, prompt_tokens=8, new_tokens=20),
                    network=NetworkSpec(rtt_s=const(0.002), bandwidth_bytes_per_s=const(1e12), **network),
                    servers=ServerSpec(count=2, spans=((0, 2), (2, 4)), block_tokens_per_s=const(1000),
                                       load_s_per_block=0.1),
                    clients=ClientSpec(count=1, token_overhead_s=0.0005))


def test_the_services_decisions_are_imported_not_copied():
    assert engine.choose_span is selection.choose_span and engine.should_move is selection.should_move
    assert engine.choose_chain is routing.choose_chain and engine.replay_groups is hops.replay_groups
    assert engine.is_time_to_average is progress.is_time_to_average
    assert engine.round_candidates is progress.round_candidates


def test_one_client_on_two_servers_decodes_at_the_analytic_rate():
    # a token: three legs of half a round trip, two blocks per server at 1,000 tokens/s, the client's own work
    per_token = 3 * 0.001 + 4 / 1000 + 0.0005
    report = simulate_scenario(two_servers())
    assert report["tokens_per_s"] == pytest.approx(1 / per_token, rel=1e-6)
    # on one machine a chained decoding step of 2 hops costs 4 messages of half a round trip each: the three
    # legs and the client handling the first hop's reply (its request to the second went ahead)
    shared = simulate_scenario(two_servers(shared_host=True))
    assert shared["tokens_per_s"] == pytest.approx(1 / (4 * 0.001 + 4 / 1000 + 0.0005), rel=1e-6)


def test_a_seed_gives_the_same_report_and_another_seed_another():
    sc = load_scenario(SCENARIOS / "petals-llama2-70b.toml")
    short = dataclasses.replace(sc, duration_s=400)
    a, b = simulate_scenario(short), simulate_scenario(short)
    c = simulate_scenario(dataclasses.replace(short, seed=1))
    for r in (a, b, c):
        r.pop("wall_s")
    assert a == b and a != c


def test_servers_choosing_spans_fill_the_emptiest_blocks_as_choose_span_says():
    sc = Scenario(duration_s=5, model=ModelSpec(n_layers=6),
                  servers=ServerSpec(count=3, placement="choose", num_blocks=2, block_tokens_per_s=const(100),
                                     load_s_per_block=0.1), clients=ClientSpec(count=0))
    sim = engine.Simulation(sc)
    sim.run()
    assert sorted((s.start, s.end) for s in sim.servers) == [(0, 2), (2, 4), (4, 6)]


def test_a_killed_server_with_a_spare_is_replaced_and_the_generation_goes_on():
    sc = dataclasses.replace(two_servers(), servers=dataclasses.replace(
        two_servers().servers, count=3, spans=((0, 2), (2, 4), (2, 4)), churn=ChurnSpec(chain_kills=((10, 2),))))
    r = simulate_scenario(sc)
    assert r["recoveries"] == 1 and r["failed_generations"] == 0 and r["servers_left"] == 1
    assert 0 < r["recovery_s"]["median"] < 0.1
    assert r["generations"] > 10                      # it went on generating


def failover(**servers) -> dict:
    """Two blocks servers and a spare for 2:4; the chain's 2:4 one killed after the 10th token."""
    base = two_servers()
    sc = dataclasses.replace(base, servers=dataclasses.replace(
        base.servers, count=3, spans=((0, 2), (2, 4), (2, 4)), churn=ChurnSpec(chain_kills=((10, 2),)), **servers),
        clients=dataclasses.replace(base.clients, open_s=0.004, control_rtt_s=0.001))
    return simulate_scenario(sc)


def test_a_failover_costs_its_phases_opening_the_replay_relinking_and_the_step():
    r = failover()
    [phases] = r["recovery_phases"]
    assert sum(phases.values()) == pytest.approx(r["recovery_s"]["median"])
    # opening: the spare's first session, a measured 4 ms (nothing follows the lost hop, so no one is told)
    assert phases["open"] == pytest.approx(0.004)
    # the replay: the prompt (8 tokens) and 9 one-token steps through 2 blocks at 1,000 tokens/s, in one
    # request (half a round trip each way)
    assert phases["replay"] == pytest.approx(0.002 + 2 * (8 + 9) / 1000)
    # re-linking the 0:2 server to it: a round trip, and in its handler that server dials the spare (about an
    # opening's cost)
    assert phases["relink"] == pytest.approx(0.002 + 0.004)
    # the step goes on from the replacement: there, its 2 blocks, back, the client's work
    assert phases["step"] == pytest.approx(0.002 + 2 / 1000 + 0.0005)


def test_a_replay_costs_its_factor_and_a_fresh_server_more_unless_it_served_before():
    plain = failover()["recovery_phases"][0]["replay"]
    assert failover(replay_factor=2.0)["recovery_phases"][0]["replay"] == pytest.approx(0.002 + 2 * (plain - 0.002))
    # the spare never computed: a cold replay factor applies to it (and its first-computation warm-up is in it)
    cold = failover(replay_factor=2.0, cold_replay_factor=5.0, warmup_s=1.0)["recovery_phases"][0]
    assert cold["replay"] == pytest.approx(0.002 + 5 * (plain - 0.002))
    served = failover(replay_factor=2.0, cold_replay_factor=5.0, warmup_s=1.0, cold_open_s=0.5,
                      served_before=True)["recovery_phases"][0]
    assert served["replay"] == pytest.approx(0.002 + 2 * (plain - 0.002)) and served["open"] == pytest.approx(0.004)


def test_without_a_spare_the_generation_fails_after_the_recovery_timeout():
    base = two_servers()
    sc = dataclasses.replace(base, duration_s=40,
                             servers=dataclasses.replace(base.servers, churn=ChurnSpec(chain_kills=((10, 2),))),
                             clients=dataclasses.replace(base.clients, recovery_timeout_s=5.0))
    r = simulate_scenario(sc)
    assert r["failed_generations"] >= 1 and r["recoveries"] == 0
    assert r["coverage"]["final"] == 0.5
    assert r["route_failures"] > 0


def test_churn_takes_servers_away_and_brings_them_back():
    sc = Scenario(duration_s=2000, sample_every_s=5, model=ModelSpec(n_layers=8),
                  servers=ServerSpec(count=40, placement="choose", num_blocks=2, load_s_per_block=1,
                                     churn=ChurnSpec(mean_uptime_s=200, mean_downtime_s=100)),
                  clients=ClientSpec(count=2))
    r = simulate_scenario(sc)
    assert r["servers_left"] > 100 and r["servers_joined"] > 100
    assert r["coverage"]["fully_covered_fraction"] > 0.5 and r["decoded_tokens"] > 0


def test_span_choice_balances_better_than_random_placement():
    base = Scenario(duration_s=600, sample_every_s=10, model=ModelSpec(n_layers=40),
                    servers=ServerSpec(count=200, placement="choose", num_blocks=5,
                                       block_tokens_per_s=const(100), load_s_per_block=0.5, join_over_s=100,
                                       rebalance_period_s=60),
                    clients=ClientSpec(count=0))
    chosen = simulate_scenario(base)["coverage"]["mean_bottleneck_after_warmup"]
    random_ = simulate_scenario(dataclasses.replace(
        base, servers=dataclasses.replace(base.servers, placement="random")))["coverage"]["mean_bottleneck_after_warmup"]
    # 200 servers x 5 blocks over 40 blocks: 25 servers a block on average; choose_span gets close to it
    assert chosen >= 2000 and chosen > 1.3 * random_


def test_training_rounds_follow_the_target_batch():
    sc = Scenario(duration_s=600, model=ModelSpec(n_layers=4), servers=ServerSpec(count=0, placement="choose"),
                  clients=ClientSpec(count=0),
                  training=TrainingSpec(peers=8, samples_per_s=const(10), micro_batch=4, target_batch=160,
                                        model_bytes=1e6, bandwidth_bytes_per_s=const(1e8)))
    r = simulate_scenario(sc)["training"]
    # 8 peers x 10 samples/s: a 160-sample step every 2 s of compute, plus a short round
    assert r["global_steps"] > 200 and 60 < r["samples_per_s"] <= 80


def test_simulate_json_prints_one_object_with_tokens_per_s():
    done = run_cli("simulate", str(SCENARIOS / "loopback-2-servers.toml"), "--json", timeout_s=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["tokens_per_s"] > 0 and report["scenario"] == "loopback-2-servers"
