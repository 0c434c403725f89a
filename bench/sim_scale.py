"""The simulator at scale: its wall time for scenarios/scale-1000.toml (1,000 servers, 100 clients,
one simulated hour; the issue's bound is 60 s), how that grows to 10,000 servers, what swarmlm's
span choice balances against random placement, and Llama-2-70B tokens/s beside Petals' figure.

    python bench/sim_scale.py [--growth 1000 2000 5000 10000] [--growth-s 600]

Prints one JSON line per result. Growth runs `--growth-s` simulated seconds of scale-1000 with
N servers and N/10 clients and reports the wall time per simulated hour. Balance runs
scale-1000's servers without churn or clients for 20 minutes, placed by `choose_span` (with
rebalancing) and at random: the bottleneck block's summed throughput after warm-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from swarmlm.sim.run import simulate_scenario        # noqa: E402
from swarmlm.sim.scenario import ChurnSpec, load_scenario   # noqa: E402

PETALS_LLAMA2_70B_TOKENS_PER_S = 6.0     # "up to 6 tokens/s" single-batch, Petals' public swarm


def emit(name: str, value: float, unit: str, **extra) -> None:
    print(json.dumps({"name": name, "value": round(value, 4), "unit": unit, **extra}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--growth", type=int, nargs="*", default=[1000, 2000, 5000, 10000])
    ap.add_argument("--growth-s", type=float, default=600.0)
    args = ap.parse_args()
    scale = load_scenario(ROOT / "scenarios" / "scale-1000.toml")

    r = simulate_scenario(scale)
    emit("scale_1000_servers_100_clients_1h_wall_s", r["wall_s"], "s (bound 60)", events=r["events"],
         tokens_per_s=round(r["tokens_per_s"], 3), recoveries=r["recoveries"],
         fully_covered=r["coverage"]["fully_covered_fraction"])

    for n in args.growth:
        sc = dataclasses.replace(scale, duration_s=args.growth_s,
                                 servers=dataclasses.replace(scale.servers, count=n),
                                 clients=dataclasses.replace(scale.clients, count=max(1, n // 10)))
        r = simulate_scenario(sc)
        emit(f"wall_s_per_simulated_hour_{n}_servers", r["wall_s"] * 3600 / args.growth_s, "s",
             clients=n // 10, events=r["events"])

    calm = dataclasses.replace(scale, duration_s=1200, clients=dataclasses.replace(scale.clients, count=0),
                               servers=dataclasses.replace(scale.servers, churn=ChurnSpec()))
    chosen = simulate_scenario(calm)["coverage"]
    placed = simulate_scenario(dataclasses.replace(
        calm, servers=dataclasses.replace(calm.servers, placement="random")))["coverage"]
    emit("bottleneck_tokens_per_s_choose_span", chosen["mean_bottleneck_after_warmup"], "tokens/s")
    emit("bottleneck_tokens_per_s_random", placed["mean_bottleneck_after_warmup"], "tokens/s")
    emit("bottleneck_ratio_choose_over_random",
         chosen["mean_bottleneck_after_warmup"] / max(placed["mean_bottleneck_after_warmup"], 1e-9), "x")

    r = simulate_scenario(load_scenario(ROOT / "scenarios" / "petals-llama2-70b.toml"))
    emit("llama2_70b_tokens_per_s_per_client", r["tokens_per_s"], "tokens/s",
         median=r["tokens_per_s_per_client"]["median"], p90=r["tokens_per_s_per_client"]["p90"],
         petals_published=PETALS_LLAMA2_70B_TOKENS_PER_S)


if __name__ == "__main__":
    main()
