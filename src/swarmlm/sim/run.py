"""`swarmlm simulate SCENARIO.toml [--measure MODEL_DIR] [--json]`: run a scenario, print its report.

With `--json`, one JSON object (report.py: at least `tokens_per_s`); with `--measure`, the
scenario's costs are first replaced by this machine's (measure.py), and the report carries them
under "measured".
"""

from __future__ import annotations

import json
import time
from typing import Any


def simulate_scenario(scenario: Any) -> dict[str, Any]:
    """Run `scenario` and summarise it (wall time included)."""
    from swarmlm.sim.engine import Simulation
    from swarmlm.sim.report import summarize

    sim = Simulation(scenario)
    t0 = time.perf_counter()
    out = sim.run()
    return summarize(sim, out, time.perf_counter() - t0)


def simulate_from_args(args: Any) -> int:
    from swarmlm.sim.report import describe
    from swarmlm.sim.scenario import load_scenario

    scenario = load_scenario(args.scenario)
    measured = None
    if args.measure:
        from swarmlm.sim.measure import apply_measured, measure
        measured = measure(args.measure)
        scenario = apply_measured(scenario, measured)
        scenario.check()
    report = simulate_scenario(scenario)
    if measured is not None:
        report["measured"] = measured.as_dict()
    if args.json:
        print(json.dumps(report))
    else:
        if measured is not None:
            print(f"measured here: {measured.block_tokens_per_s:.0f} tokens/s per block, step overhead "
                  f"{measured.step_overhead_s * 1e3:.2f} ms, client {measured.client_token_s * 1e3:.2f} ms a token, "
                  f"loopback round trip {measured.rtt_s * 1e3:.3f} ms")
        print(describe(report))
    return 0
