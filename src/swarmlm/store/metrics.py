"""What a storage node counts, for Prometheus (`swarmlm node --metrics-port`): blocks and bytes
served, requests refused, roots pinned and pins failed.

`watch(node)` registers a collector that reads the node's own totals when Prometheus scrapes,
so the node keeps no second set of counters. Exposing the registry over HTTP is the command's
business (cli.py); nothing here opens a socket.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector


class NodeCollector(Collector):
    def __init__(self, node: Any):
        self.node = node

    def collect(self):
        service = self.node.service
        yield CounterMetricFamily("swarmlm_store_served_blocks", "blocks sent to other peers",
                                  value=float(service.served_blocks))
        yield CounterMetricFamily("swarmlm_store_sent_bytes", "block bytes sent to other peers",
                                  value=float(service.served_bytes))
        yield CounterMetricFamily("swarmlm_store_refusals", "block requests refused as malformed",
                                  value=float(service.refused_requests))
        yield CounterMetricFamily("swarmlm_store_pin_failures", "pin requests that failed",
                                  value=float(self.node.pin_failures))
        yield GaugeMetricFamily("swarmlm_store_pinning", "pins in progress", value=float(len(self.node._pinning)))


_watched: list[NodeCollector] = []


def replace_watched(watched: list, collector: Collector, registry: Any = REGISTRY) -> None:
    """Register `collector` in place of the ones in `watched` (one module's list of its collectors),
    so watching a new object never reports the old one's totals beside it."""
    while watched:
        registry.unregister(watched.pop())
    registry.register(collector)
    watched.append(collector)


def watch(node: Any, registry: Any = REGISTRY) -> None:
    """Report `node`'s totals from now on (replacing a node watched before)."""
    replace_watched(_watched, NodeCollector(node), registry)
