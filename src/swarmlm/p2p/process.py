"""Peers as child processes: start a command line, read the multiaddrs the child prints once
reachable, stop it cleanly (SIGTERM) or kill it (SIGKILL).

Knows nothing of what the child runs: the callers build the command line, each in the layer
that owns the command (`swarm.server.serve.start_server_process` for `swarmlm serve`,
`demo/children.py` for the demo's `swarmlm node` and `swarmlm train --swarm`, the test helpers
for theirs). `child_env` puts this checkout's package first on a Python child's path.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import swarmlm


class PeerProcess:
    """One child; `maddrs` once ready; `output` collects every stdout line it printed."""

    def __init__(self, proc: subprocess.Popen, log_path: Path):
        self.proc = proc
        self.log_path = log_path
        self.maddrs: list[str] = []
        self.output: list[str] = []
        self.started_at = time.monotonic()
        self.ready_after_s: float | None = None    # launch to first multiaddr
        self._first = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:            # until the child closes stdout
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.output.append(line)
            if line.startswith("/") and "/p2p/" in line:
                self.maddrs.append(line.strip())
                self._first.set()

    @property
    def peer_id(self) -> str:
        return self.maddrs[0].rsplit("/p2p/", 1)[1]

    def wait_ready(self, timeout_s: float) -> list[str]:
        """Wait for the multiaddr lines; on failure kill the child and raise with its log's tail."""
        deadline = self.started_at + timeout_s
        while not self._first.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.describe()} did not start in {timeout_s:.0f} s; its log:\n{self.log_tail()}")
        self.ready_after_s = time.monotonic() - self.started_at
        time.sleep(0.1)                  # the other lines were printed and flushed together
        return self.maddrs

    def wait_exit(self, timeout_s: float) -> int:
        """Wait for the child to finish on its own; kill it after `timeout_s`."""
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"{self.describe()} did not finish in {timeout_s:.0f} s; its log:\n{self.log_tail()}")
        self._reader.join(5)
        return code

    def describe(self) -> str:
        """A few words of the command: `swarmlm serve MODEL` for `python -m swarmlm serve MODEL ...`."""
        argv = [str(a) for a in self.proc.args]
        words = argv[2:5] if argv[1:2] == ["-m"] else [Path(argv[0]).name, *argv[1:3]]
        return " ".join(words)

    def log_text(self) -> str:
        """Everything the child wrote to its log so far ("" if unreadable)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n_chars: int = 4000) -> str:
        return self.log_text()[-n_chars:]

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM, then wait (SIGKILL if it does not exit in time)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def __enter__(self) -> "PeerProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def open_child(command: Sequence[str | os.PathLike], *, log_path: str | os.PathLike,
               env: dict[str, str] | None = None) -> subprocess.Popen:
    """Run `command` with stdout piped, stderr to `log_path`, no stdin, and `child_env(env)`."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        return subprocess.Popen([str(a) for a in command], stdout=subprocess.PIPE, stderr=log, env=child_env(env),
                                stdin=subprocess.DEVNULL)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment, with this checkout's package first on the path, INFO logs
    unless set, and `extra` on top."""
    env = dict(os.environ)
    src = str(Path(swarmlm.__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("SWARMLM_LOG", "INFO")
    env.update(extra or {})
    return env


def start_child(command: Sequence[str | os.PathLike], *, log_path: str | os.PathLike,
                env: dict[str, str] | None = None, wait: bool = True, timeout_s: float = 120.0) -> PeerProcess:
    """Start `command` (stderr to `log_path`) and, by default, wait for the multiaddrs it prints."""
    child = PeerProcess(open_child(command, log_path=log_path, env=env), Path(log_path))
    if wait:
        child.wait_ready(timeout_s)
    return child
