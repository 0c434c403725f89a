"""Scenario files: distributions, the shipped scenarios, and one-line errors for bad ones."""

import random
from pathlib import Path

import pytest

from swarmlm.errors import UserError
from swarmlm.sim.scenario import Dist, load_scenario, parse_dist, parse_scenario
from tests.helpers.swarm import run_cli

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"


def test_distributions_sample_what_they_say():
    rng = random.Random(0)
    assert parse_dist(3, "x").sample(rng) == 3.0
    u = parse_dist({"dist": "uniform", "low": 1, "high": 2}, "x")
    assert all(1 <= u.sample(rng) <= 2 for _ in range(100)) and u.typical == 1.5
    ln = parse_dist({"dist": "lognormal", "median": 100, "sigma": 0.5}, "x")
    xs = sorted(ln.sample(rng) for _ in range(2001))
    assert 85 < xs[1000] < 115
    clipped = parse_dist({"dist": "normal", "mean": 0, "sd": 1, "min": 0.5}, "x")
    assert min(clipped.sample(rng) for _ in range(200)) == 0.5
    choice = parse_dist({"dist": "choice", "values": [1, 10], "weights": [1, 0]}, "x")
    assert {choice.sample(rng) for _ in range(20)} == {1.0}


def test_every_shipped_scenario_loads():
    names = {p.stem for p in SCENARIOS.glob("*.toml")}
    assert {"loopback-2-servers", "loopback-3-servers", "petals-llama2-70b", "scale-1000"} <= names
    for path in SCENARIOS.glob("*.toml"):
        assert load_scenario(path).name == path.stem


@pytest.mark.parametrize("doc, message", [
    ({"duration_s": 0}, "duration_s must be positive"),
    ({"nonsense": 1}, "unknown field(s) nonsense"),
    ({"servers": {"placement": "everywhere"}}, "servers.placement must be one of"),
    ({"servers": {"spans": [[0, 9]]}}, "servers.spans: 0:9 is not inside 0:4"),
    ({"servers": {"spans": [[0, 2]], "count": "two"}}, "servers: count: expected an integer"),
    ({"network": {"rtt_s": {"dist": "gaussian"}}}, "network: rtt_s: expected a number or"),
    ({"network": {"rtt_s": {"dist": "uniform", "low": 2, "high": 1}}}, "uniform needs low <= high"),
    ({"network": {"rtt_s": -1}}, "expected a number >= 0"),
    ({"network": {"shared_host": 1}}, "expected true or false"),
    ({"servers": {"spans": [[0, 2]], "churn": {"chain_kills": [[500, 1]]}}}, "chain_kills"),
    ({"servers": {"placement": "choose", "num_blocks": 5}}, "servers.num_blocks must be in 1..4"),
])
def test_bad_scenarios_are_refused_naming_the_field(doc, message):
    with pytest.raises(UserError, match=None) as e:
        parse_scenario({"servers": {"spans": [[0, 2], [2, 4]]}} | doc if "servers" not in doc else doc).check()
    assert message in str(e.value)


def test_the_command_refuses_a_bad_scenario_in_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("duration_s = [")
    for args in (["simulate", str(bad)], ["simulate", str(tmp_path / "missing.toml")]):
        done = run_cli(*args, timeout_s=60)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "swarmlm simulate: error:" in done.stderr
