"""Start `swarmlm train --swarm` peer processes for collab tests, and always stop them.

`TrainPeer(out_dir, args)` runs one peer (a `PeerProcess`); `wait_maddr()` returns the first
multiaddr it prints (once its `Peer` is up), `wait()` its exit code, `metrics()` the rows of
its metrics.jsonl so far; `kill()` sends SIGKILL. Each peer runs on one torch thread, so three
of them share two cores fairly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from swarmlm.p2p.process import PeerProcess, open_child
from tests.helpers.swarm import STARTUP_TIMEOUT_S, swarmlm_command


class TrainPeer(PeerProcess):
    def __init__(self, out: Path, args: Sequence[str]):
        self.out = Path(out)
        log_path = self.out / "peer.log"
        command = swarmlm_command(["train", "--swarm", "--no-progress", "--out", self.out, *args])
        super().__init__(open_child(command, log_path=log_path, env={"OMP_NUM_THREADS": "1", "SWARMLM_LOG": "INFO"}),
                         log_path)

    @property
    def lines(self) -> list[str]:
        return self.output

    def wait_maddr(self, timeout_s: float = STARTUP_TIMEOUT_S) -> str:
        return self.wait_ready(timeout_s)[0]

    def wait(self, timeout_s: float = 300.0) -> int:
        return self.wait_exit(timeout_s)

    def metrics(self) -> list[dict]:
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return []
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass                      # a line being written
        return rows


def stop_all(peers: Sequence[TrainPeer]) -> None:
    for p in peers:
        p.kill()
