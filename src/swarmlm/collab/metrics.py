"""What a collaborative-training peer counts, for Prometheus (`train --swarm --metrics-port`).

`watch(opt)` registers a collector that reads the optimizer's own totals (steps, samples,
failed rounds, state downloads, bytes, loss, peers) whenever Prometheus scrapes, so the
optimizer keeps no second set of counters; `ROUND_SECONDS` times the averaging rounds.
Exposing the registry over HTTP is the command's business (cli.py); nothing here opens a socket.
"""

from __future__ import annotations

import math
from typing import Any

from prometheus_client import REGISTRY, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from swarmlm.store.metrics import replace_watched

ROUND_SECONDS = Histogram("swarmlm_collab_round_seconds", "averaging rounds that succeeded, by duration",
                          buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))


class OptimizerCollector(Collector):
    """Reads a `CollaborativeOptimizer`'s totals at scrape time."""

    def __init__(self, opt: Any):
        self.opt = opt

    def collect(self):
        opt = self.opt
        counters = {"steps": ("local optimizer steps of this peer", opt.local_step),
                    "samples": ("samples behind the global model, summed over the swarm", opt.samples_seen),
                    "rounds_failed": ("averaging rounds that failed", opt.rounds_failed),
                    "catch_ups": ("state downloads from another peer", opt.catch_ups),
                    "sent_bytes": ("bytes sent by averaging rounds", opt.reducer.bytes_sent),
                    "received_bytes": ("bytes received by averaging rounds", opt.reducer.bytes_received)}
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(f"swarmlm_collab_{name}", doc, value=float(value))
        yield GaugeMetricFamily("swarmlm_collab_global_step", "the run's global step as this peer knows it",
                                value=float(opt.global_step))
        yield GaugeMetricFamily("swarmlm_collab_peers", "peers of the run this peer sees", value=float(opt.swarm_size))
        loss = opt.loss_ema
        yield GaugeMetricFamily("swarmlm_collab_loss", "this peer's recent training loss (NaN until known)",
                                value=float(loss) if math.isfinite(loss) else math.nan)


_watched: list[OptimizerCollector] = []


def watch(opt: Any, registry: Any = REGISTRY) -> None:
    """Report `opt`'s totals from now on (replacing an optimizer watched before)."""
    replace_watched(_watched, OptimizerCollector(opt), registry)
