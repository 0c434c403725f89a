"""Start `swarmlm train --swarm` peer processes for collab tests, and always stop them.

`TrainPeer(out_dir, args)` runs one peer; `wait_maddr()` returns the first multiaddr it
prints (once its `Peer` is up), `wait()` its exit code; `kill()` sends SIGKILL. Each peer
runs on one torch thread, so three of them share two cores fairly.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from tests.helpers.swarm import STARTUP_TIMEOUT_S, _env


class TrainPeer:
    def __init__(self, out: Path, args: Sequence[str]):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self._log = open(self.out / "peer.log", "wb")  # noqa: SIM115 (closed by stop_all)
        cmd = [sys.executable, "-m", "swarmlm", "train", "--swarm", "--no-progress", "--out", str(self.out), *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log,
                                     env=_env({"OMP_NUM_THREADS": "1", "SWARMLM_LOG": "INFO"}))
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.decode(errors="replace").rstrip("\n"))

    def wait_maddr(self, timeout_s: float = STARTUP_TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout_s
        while not self.lines and time.monotonic() < deadline and self.proc.poll() is None:
            time.sleep(0.1)
        if not self.lines:
            self.kill()
            raise RuntimeError(f"peer did not start; its log:\n{self.log_text()[-4000:]}")
        return self.lines[0]

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

    def wait(self, timeout_s: float = 300.0) -> int:
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"peer did not finish in {timeout_s} s; its log:\n{self.log_text()[-4000:]}")
        self._reader.join(5)
        return code

    def log_text(self) -> str:
        self._log.flush()
        return (self.out / "peer.log").read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def stop_all(peers: Sequence[TrainPeer]) -> None:
    for p in peers:
        p.kill()
        p._log.close()
