"""Start peers for multi-peer tests, and always stop them.

- `LoopThread`: one asyncio loop in a background thread, so a module-scoped fixture can keep
  real `Peer`s up across tests: `loop.run(coro, timeout_s=60)`.
- `NodeProcess` / `start_nodes(n, tmp_path)`: `swarmlm node` subprocesses on 127.0.0.1, each
  with its own data dir; their printed multiaddrs are read back (the node prints them once
  reachable). `stop()` sends SIGTERM and waits, `kill()` sends SIGKILL; `stop_all` in teardown.
- `run_cli(*args)`: `python -m swarmlm ...` as a subprocess, returning the CompletedProcess.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Coroutine, Sequence

STARTUP_TIMEOUT_S = 120.0      # p2pd plus hivemind's import can take long on a loaded 2-core machine


class LoopThread:
    """An event loop running in a daemon thread; `run` submits a coroutine and waits for it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout_s: float = 120.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("SWARMLM_LOG", "INFO")
    env.update(extra or {})
    return env


class NodeProcess:
    """One `swarmlm node` subprocess; `maddrs` are the lines it printed once reachable."""

    def __init__(self, data_dir: Path, args: Sequence[str] = (), env: dict[str, str] | None = None):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir / "node.log"
        self._log = open(self.log_path, "wb")
        cmd = [sys.executable, "-m", "swarmlm", "node", "--host", "127.0.0.1", "--data-dir", str(self.data_dir),
               *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, env=_env(env))
        self.maddrs: list[str] = []

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> list[str]:
        """Read multiaddr lines from stdout until the first one arrives (all are printed together)."""
        deadline = time.monotonic() + timeout_s
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(self.proc.stdout.readline().decode()), daemon=True)
        reader.start()
        reader.join(max(0.0, deadline - time.monotonic()))
        if not lines or not lines[0].strip():
            self.kill()
            raise RuntimeError(f"node did not start; its log:\n{self.log_text()[-4000:]}")
        self.maddrs = [lines[0].strip()]
        return self.maddrs

    @property
    def peer_id(self) -> str:
        return self.maddrs[0].rsplit("/p2p/", 1)[1]

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, then wait; SIGKILL if it does not exit in time. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


def start_nodes(n: int, root: Path, *, first_args: Sequence[str] = (), args: Sequence[str] = (),
                env: dict[str, str] | None = None) -> list[NodeProcess]:
    """n nodes: the first starts the swarm, the rest join through it. Stops all of them on failure."""
    nodes: list[NodeProcess] = []
    try:
        first = NodeProcess(Path(root) / "node0", [*first_args, *args], env)
        nodes.append(first)
        first.wait_ready()
        rest = [NodeProcess(Path(root) / f"node{i}", ["--initial-peers", first.maddrs[0], *args], env)
                for i in range(1, n)]
        nodes.extend(rest)
        for node in rest:
            node.wait_ready()
        return nodes
    except BaseException:
        stop_all(nodes)
        raise


def stop_all(nodes: Sequence[NodeProcess]) -> None:
    for node in nodes:
        try:
            node.stop()
        except Exception:
            node.kill()


def run_cli(*args: str, timeout_s: float = 300.0, env: dict[str, str] | None = None,
            input: bytes | None = None) -> subprocess.CompletedProcess:
    """`python -m swarmlm ARGS` with the test environment; stdout as bytes, stderr as text."""
    proc = subprocess.run([sys.executable, "-m", "swarmlm", *args], capture_output=True, timeout=timeout_s,
                          env=_env(env), input=input)
    proc.stderr = proc.stderr.decode(errors="replace")
    return proc


def p2pd_children(pid: int) -> list[int]:
    """PIDs of the p2pd processes whose parent is `pid` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            comm = stat[stat.index("(") + 1:stat.rindex(")")]
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError):
            continue
        if comm == "p2pd" and ppid == pid:
            out.append(int(entry.name))
    return out


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"      # a zombie is dead, just not yet reaped
