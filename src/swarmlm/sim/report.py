"""A simulation's results as one plain JSON-able report, and as a few lines for people.

    report = summarize(sim, results, wall_s)      # {"tokens_per_s": ..., "ttft_s": {...}, ...}
    print(describe(report))
"""

from __future__ import annotations

import statistics
from typing import Any, Sequence

from swarmlm.sim.engine import MAX_TIMELINE, Results, Simulation

MAX_PHASES = 20             # failovers whose phases a report lists (open, replay, relink, step: seconds)


def quantiles(xs: Sequence[float]) -> dict[str, float | None]:
    if not xs:
        return {"n": 0, "median": None, "p10": None, "p90": None, "max": None}
    s = sorted(xs)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))]      # noqa: E731
    return {"n": len(s), "median": statistics.median(s), "p10": pick(0.1), "p90": pick(0.9), "max": s[-1]}


def summarize(sim: Simulation, out: Results, wall_s: float) -> dict[str, Any]:
    sc = sim.sc
    rates = []
    for c in sim.clients:                  # completed generations, plus the one under way at the end
        tokens, seconds = c.decode_tokens, c.decode_s
        if c.chain and c.first_token_at > 0 and c.generated > 1:
            tokens, seconds = tokens + c.generated - 1, seconds + c.last_token_at - c.first_token_at
        if seconds > 0:
            rates.append(tokens / seconds)
    timeline = out.timeline
    step = max(1, len(timeline) // MAX_TIMELINE)
    covered = [cov for _, cov, _, _ in timeline]
    bottleneck = [b for _, _, _, b in timeline]
    last = len(timeline) // 2                              # the second half: after joining settles
    return {
        "scenario": sc.name, "simulated_s": sc.duration_s, "wall_s": round(wall_s, 3), "events": out.events,
        "servers": len(sim.servers), "clients": len(sim.clients), "blocks": sim.n_layers,
        "tokens_per_s": statistics.fmean(rates) if rates else 0.0,
        "tokens_per_s_per_client": quantiles(rates),
        "decoded_tokens": sum(c.decode_tokens + (max(0, c.generated - 1) if c.chain else 0) for c in sim.clients),
        "ttft_s": quantiles(out.ttft_s),
        "generations": out.generations, "failed_generations": out.failed_generations,
        "route_failures": out.route_failures,
        "recoveries": len(out.recovery_s), "recovery_s": quantiles(out.recovery_s),
        "recovery_phases": out.recovery_phases[:MAX_PHASES],
        "servers_joined": out.joins, "servers_left": out.leaves, "moves": out.moves,
        "coverage": {
            "final": covered[-1] if covered else 0.0,
            "min_after_warmup": min(covered[last:], default=0.0),
            "fully_covered_fraction": sum(1 for c in covered if c >= 1.0) / len(covered) if covered else 0.0,
            "bottleneck_tokens_per_s": bottleneck[-1] if bottleneck else 0.0,
            "mean_bottleneck_after_warmup": statistics.fmean(bottleneck[last:]) if bottleneck[last:] else 0.0,
            "timeline": [[round(t, 3), round(c, 4), m, round(b, 3)] for t, c, m, b in timeline[::step]],
        },
        "training": {
            "peers": len(sim.trainers), "global_steps": out.global_steps,
            "samples_per_s": out.trained_samples / sc.duration_s,
            "round_s": quantiles(out.rounds),
        },
    }


def describe(report: dict[str, Any]) -> str:
    r, cov, tr = report, report["coverage"], report["training"]
    f = lambda x, d=2: "-" if x is None else f"{x:.{d}f}"      # noqa: E731
    lines = [
        f"scenario {r['scenario']}: {r['servers']} servers, {r['clients']} clients, {r['blocks']} blocks, "
        f"{r['simulated_s']:.0f} s simulated in {r['wall_s']:.1f} s ({r['events']} events)",
        f"  tokens/s per client  mean {f(r['tokens_per_s'])}  median {f(r['tokens_per_s_per_client']['median'])}"
        f"  p10 {f(r['tokens_per_s_per_client']['p10'])}  ({r['decoded_tokens']} tokens, {r['generations']} generations)",
        f"  time to first token  median {f(r['ttft_s']['median'], 3)} s  p90 {f(r['ttft_s']['p90'], 3)} s",
        f"  recoveries           {r['recoveries']}  median {f(r['recovery_s']['median'], 3)} s  max "
        f"{f(r['recovery_s']['max'], 3)} s  failed generations {r['failed_generations']}",
        f"  coverage             final {cov['final']:.0%}  fully covered {cov['fully_covered_fraction']:.0%} of the time"
        f"  bottleneck block {cov['bottleneck_tokens_per_s']:.0f} tokens/s  ({r['servers_left']} left, {r['moves']} moves)",
    ]
    if tr["peers"]:
        lines.append(f"  training             {tr['peers']} peers  {tr['global_steps']} global steps  "
                     f"{tr['samples_per_s']:.1f} samples/s  round median {f(tr['round_s']['median'], 3)} s")
    return "\n".join(lines)
