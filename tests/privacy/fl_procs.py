"""Run a federated run as real processes on 127.0.0.1: one `swarmlm fl coordinate`, N `swarmlm fl join`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from swarmlm.p2p.process import PeerProcess, start_child
from tests.helpers.swarm import STARTUP_TIMEOUT_S, swarmlm_command


@dataclass
class FlRun:
    out: Path
    coordinator: PeerProcess
    clients: list[PeerProcess]

    @property
    def rounds(self) -> list[dict]:
        return [json.loads(line) for line in (self.out / "rounds.jsonl").read_text().splitlines() if line.strip()]


def run_fl(root: Path, model: Path, shards: Sequence[Path], *, run_id: str, coord_args: Sequence[str] = (),
           client_env: dict[int, dict[str, str]] | None = None, timeout_s: float = 240.0) -> FlRun:
    """Start a coordinator and one client per shard; wait for all of them to exit; the run's files."""
    root.mkdir(parents=True, exist_ok=True)
    out = root / "out"
    coord = start_child(swarmlm_command(["fl", "coordinate", model, "--run-id", run_id, "--out", out,
                                         "--data-dir", root / "coord", "--host", "127.0.0.1", *coord_args]),
                        log_path=root / "coord.log", timeout_s=STARTUP_TIMEOUT_S)
    clients: list[PeerProcess] = []
    try:
        for i, shard in enumerate(shards):
            clients.append(start_child(
                swarmlm_command(["fl", "join", "--run-id", run_id, "--initial-peers", coord.maddrs[0], "--data", shard,
                                 "--data-dir", root / f"client{i}", "--seed", str(i), "--host", "127.0.0.1"]),
                log_path=root / f"client{i}.log", env=(client_env or {}).get(i), wait=False))
        code = coord.wait_exit(timeout_s)
        assert code == 0, f"the coordinator exited with {code}:\n{coord.log_tail()}\n" + "\n".join(coord.output[-10:])
        for c in clients:
            c.wait_exit(60.0)
        return FlRun(out, coord, clients)
    finally:
        for p in [coord, *clients]:
            p.kill()
