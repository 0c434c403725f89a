"""The simulator against real swarms on loopback, measured in the same run: the issue's check.

    python bench/sim_against_reality.py [--trials 3] [--tokens 64]

A tiny random Llama (4 blocks) is served by real `swarmlm serve` processes on 127.0.0.1. Each
trial, alternating: `measure()` (sim/measure.py: this machine's compute per block, overheads and
loopback round trip, from one real server of its own) and the real swarm:
- tokens/s: two servers (blocks 0:2, 2:4), `swarmlm generate --swarm --json` greedy (`--runs`
  times, median), against scenarios/loopback-2-servers.toml simulated with the trial's
  measurement;
- failover: a third server (2:4); the chain's 2:4 server is killed (SIGKILL) after the 40th token,
  as scenarios/loopback-3-servers.toml kills it, and the real failover (from the client noticing
  the loss to the next token) is set beside the simulated one.
Prints one JSON line per result (medians over the trials) and the ratios simulated / real; the
issue's targets are 0.8-1.2 for tokens/s and 0.5-1.5 for the failover. Timings on a loaded
machine are noisy: compare the ratios, run it on a quiet one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from swarmlm.sim.measure import apply_measured, measure            # noqa: E402
from swarmlm.sim.run import simulate_scenario                       # noqa: E402
from swarmlm.sim.scenario import load_scenario                      # noqa: E402
from swarmlm.swarm.client.model import RemoteModel                  # noqa: E402
from swarmlm.swarm.server.serve import start_server_process         # noqa: E402
from tests.helpers.swarm import run_cli                             # noqa: E402
from tests.helpers.swarm_servers import build_checkpoint            # noqa: E402

SCENARIOS = ROOT / "scenarios"
ENV = {"OMP_NUM_THREADS": "1"}
KILL_AFTER = 40


def real_tokens_per_s(ckpt: Path, maddr: str, runs: int, tokens: int) -> float:
    rates = []
    for _ in range(runs):
        done = run_cli("generate", str(ckpt), "--swarm", "--initial-peers", maddr, "--prompt", "the quick brown fox",
                       "--max-new-tokens", str(tokens), "--temperature", "0", "--json", env=ENV, timeout_s=180)
        assert done.returncode == 0, done.stderr
        rates.append(json.loads(done.stdout)["tokens_per_s"])
    return statistics.median(rates)


class Noticed(logging.Handler):
    """When the client's session logged that a server failed."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.at: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "replacing it" in record.getMessage():
            self.at.append(time.perf_counter())


def real_failover_s(ckpt: Path, maddr: str, servers_24: dict) -> tuple[float, float]:
    """(kill -> the client notices, noticing -> the next token), generating on the client's own loop."""
    noticed = Noticed()
    log = logging.getLogger("swarmlm.swarm.client.session")
    log.addHandler(noticed)
    log.setLevel(logging.WARNING)          # whatever the root's level: the warning is the moment wanted
    try:
        with RemoteModel.connect(str(ckpt), initial_peers=[maddr], connect_timeout_s=60) as remote:
            async def run() -> tuple[list[float], float]:
                stamps, killed_at = [], 0.0
                async for _ in remote.generate_steps([[1, 2, 3, 4, 5, 6]], max_new_tokens=100):
                    stamps.append(time.perf_counter())
                    if len(stamps) == KILL_AFTER:
                        hop = next(h for h in remote.last_session.chain if h.start == 2)
                        os.kill(servers_24.pop(hop.peer_id).proc.pid, signal.SIGKILL)
                        killed_at = time.perf_counter()
                return stamps, killed_at

            stamps, killed_at = remote.runner.run(run())
            assert remote.last_session.recoveries == 1, "no failover happened"
    finally:
        log.removeHandler(noticed)
    return noticed.at[0] - killed_at, stamps[KILL_AFTER] - noticed.at[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--runs", type=int, default=5, help="real generations per trial (median)")
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    logging.basicConfig(level=logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="swarmlm-bench-sim-") as tmp:
        tmp = Path(tmp)
        ckpt = build_checkpoint(tmp / "ckpt", "llama")
        two, three = load_scenario(SCENARIOS / "loopback-2-servers.toml"), load_scenario(SCENARIOS / "loopback-3-servers.toml")
        rows = []
        for trial in range(args.trials):
            servers = []
            try:
                a = start_server_process(ckpt, blocks=(0, 2), data_dir=tmp / f"a{trial}", env=ENV)
                servers.append(a)
                servers.append(start_server_process(ckpt, blocks=(2, 4), data_dir=tmp / f"b{trial}", env=ENV,
                                                    initial_peers=a.maddrs[:1]))
                m = measure(ckpt)
                sim_tps = simulate_scenario(apply_measured(two, m))["tokens_per_s"]
                real_tps = real_tokens_per_s(ckpt, a.maddrs[0], args.runs, args.tokens)
                servers.append(start_server_process(ckpt, blocks=(2, 4), data_dir=tmp / f"c{trial}", env=ENV,
                                                    initial_peers=a.maddrs[:1]))
                detect_s, real_fail = real_failover_s(ckpt, a.maddrs[0], {p.peer_id: p for p in servers[1:]})
                sim3 = simulate_scenario(apply_measured(three, m))
                rows.append((sim_tps, real_tps, sim3["recovery_s"]["median"], real_fail, detect_s, m))
                print(json.dumps({"trial": trial, "sim_tokens_per_s": round(sim_tps, 1), "real_tokens_per_s": real_tps,
                                  "sim_failover_s": round(rows[-1][2], 4), "real_failover_s": round(real_fail, 4),
                                  "real_detect_s": round(detect_s, 4), "measured": m.as_dict()}), flush=True)
            finally:
                for p in servers:
                    p.kill()
        med = lambda i: statistics.median(r[i] for r in rows)          # noqa: E731
        ratio_tps = statistics.median(r[0] / r[1] for r in rows)
        ratio_fail = statistics.median(r[2] / r[3] for r in rows)
        for name, value, unit in (("sim_tokens_per_s", med(0), "tokens/s"), ("real_tokens_per_s", med(1), "tokens/s"),
                                  ("tokens_per_s_ratio_sim_over_real", ratio_tps, "x (target 0.8-1.2)"),
                                  ("sim_failover_s", med(2), "s"), ("real_failover_s", med(3), "s"),
                                  ("failover_ratio_sim_over_real", ratio_fail, "x (target 0.5-1.5)"),
                                  ("real_detect_s", med(4), "s")):
            print(json.dumps({"name": name, "value": round(value, 4), "unit": unit}))


if __name__ == "__main__":
    main()
