"""The demo's dashboard: `swarmlm dashboard` as a child beside the demo's swarm, and its URL.

    dashboard, url = start_dashboard(initial, log_path=root / "dashboard.log")
    print(f"      dashboard {url}")          # open it in a browser while the demo runs
    ...
    dashboard.stop()

It joins through the swarm's bootstrap peer as a client, so it can start as soon as that peer
is up and sees the trainers, the store and the servers arrive.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

from swarmlm.demo.children import swarmlm_command
from swarmlm.p2p.process import PeerProcess, open_child


def start_dashboard(initial_peers: Sequence[str], *, log_path: str | os.PathLike, host: str = "127.0.0.1",
                    port: int = 0, interval_s: float = 1.0, timeout_s: float = 120.0) -> tuple[PeerProcess, str]:
    """Start `swarmlm dashboard` and wait for the URL it prints; the caller stops the child."""
    command = swarmlm_command(["dashboard", "--initial-peers", *initial_peers, "--host", host, "--port", port,
                               "--interval", interval_s])
    child = PeerProcess(open_child(command, log_path=log_path), Path(log_path))
    deadline = time.monotonic() + timeout_s
    while True:
        url = next((line.strip() for line in child.output if line.startswith("http://")), None)
        if url:
            return child, url
        if child.proc.poll() is not None or time.monotonic() > deadline:
            child.kill()
            raise RuntimeError(f"the dashboard did not start in {timeout_s:.0f} s; its log:\n{child.log_tail()}")
        time.sleep(0.1)
