"""Which blocks a `--num-blocks N` server takes, and when it should move.

Pure decisions over announced throughputs: no network, no clock, no randomness.

- `block_throughputs` sums the announced per-block throughput of every online server.
- `choose_span` picks the N consecutive blocks with the least total throughput (the swarm's
  weakest stretch), earliest on ties.
- `should_move` says whether a server would make the swarm better by leaving its span for
  another: first fewer blocks that nobody serves, then a higher bottleneck (the throughput of
  the weakest block) by at least `min_gain`, so that servers do not chase small differences.

Knows nothing of tensors, peers or the DHT.
"""

from __future__ import annotations

from typing import Iterable, Sequence


def block_throughputs(spans: Iterable[tuple[int, int, float]], n_layers: int) -> list[float]:
    """Total throughput per block from (start, end, per-block throughput) of each serving server."""
    total = [0.0] * n_layers
    for start, end, tps in spans:
        for i in range(max(0, start), min(n_layers, end)):
            total[i] += tps
    return total


def choose_span(throughputs: Sequence[float], n_blocks: int) -> range:
    """The `n_blocks` consecutive blocks with the least total throughput (earliest on ties)."""
    n_layers = len(throughputs)
    if not 0 < n_blocks <= n_layers:
        raise ValueError(f"cannot choose {n_blocks} blocks out of {n_layers}")
    best_start, best_sum = 0, None
    window = sum(throughputs[:n_blocks])
    for start in range(0, n_layers - n_blocks + 1):
        if start:
            window += throughputs[start + n_blocks - 1] - throughputs[start - 1]
        # compare with a tolerance so float drift in the running sum never breaks a tie
        if best_sum is None or window < best_sum - 1e-9 * max(1.0, abs(best_sum)):
            best_start, best_sum = start, window
    return range(best_start, best_start + n_blocks)


def swarm_score(throughputs: Sequence[float]) -> tuple[int, float]:
    """(minus the number of blocks nobody serves, the bottleneck throughput): higher is better."""
    return (-sum(1 for t in throughputs if t <= 0), min(throughputs) if throughputs else 0.0)


def should_move(throughputs: Sequence[float], current: range, own_tps: float, *,
                min_gain: float = 1.2) -> range | None:
    """The span this server should move to, or None to stay.

    `throughputs` include this server's own `own_tps` on `current`.
    """
    without = list(throughputs)
    for i in current:
        without[i] -= own_tps
    target = choose_span(without, len(current))
    if target == current:
        return None
    after = list(without)
    for i in target:
        after[i] += own_tps
    (uncovered_now, bottleneck_now), (uncovered_after, bottleneck_after) = swarm_score(throughputs), swarm_score(after)
    if uncovered_after > uncovered_now:          # scores hold minus the count: greater = fewer uncovered
        return target
    if uncovered_after == uncovered_now and bottleneck_after > bottleneck_now * min_gain:
        return target
    return None
