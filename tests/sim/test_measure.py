"""`swarmlm simulate --measure MODEL`: this machine's costs from a real server on loopback fill in the scenario."""

import json
from pathlib import Path

import pytest

from tests.helpers.swarm import run_cli
from tests.helpers.swarm_servers import build_checkpoint

pytestmark = pytest.mark.slow

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"


def test_measure_fills_in_this_machines_costs(tmp_path):
    ckpt = build_checkpoint(tmp_path / "llama", "llama")
    done = run_cli("simulate", str(SCENARIOS / "loopback-2-servers.toml"), "--measure", str(ckpt), "--json",
                   env={"OMP_NUM_THREADS": "1"}, timeout_s=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    m = report["measured"]
    assert m["n_layers"] == 4 and m["hidden_bytes"] == 64 * 4
    for name in ("block_tokens_per_s", "prefill_speedup", "client_token_s", "rtt_s", "one_server_token_s",
                 "control_rtt_s", "open_s", "cold_open_s"):
        assert m[name] > 0, name
    # the one-server swarm's time per token is what the model is built from: compute + overheads + a round trip
    assert m["one_server_token_s"] >= 4 / m["block_tokens_per_s"]
    assert report["tokens_per_s"] > 0 and report["recoveries"] == 0


def test_measure_refuses_a_missing_model_in_one_line(tmp_path):
    done = run_cli("simulate", str(SCENARIOS / "loopback-2-servers.toml"), "--measure", str(tmp_path / "none"),
                   timeout_s=120)
    assert done.returncode == 2 and "--measure: no model directory" in done.stderr
