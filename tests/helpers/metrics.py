"""Reading a child's Prometheus metrics: its URL from its log (`--metrics-port 0` prints it to stderr), and
one scrape as {sample name: value} over the samples without labels."""

from __future__ import annotations

import re
import urllib.request

from tests.helpers.swarm import poll_until


def metrics_url(proc) -> str:
    """The /metrics URL a child (p2p/process.py's PeerProcess) printed to its log."""
    found = poll_until(lambda: re.search(r"metrics: (http://\S+/metrics)", proc.log_text()), 60)
    assert found, f"no metrics URL in the log:\n{proc.log_tail()}"
    return found.group(1)


def scrape(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if not s.labels}
