"""Start peers for multi-peer tests, and always stop them.

- `LoopThread`: one asyncio loop in a background thread, so a module-scoped fixture can keep
  real `Peer`s up across tests: `loop.run(coro, timeout_s=60)`.
- `NodeProcess` / `start_nodes(n, tmp_path)`: `swarmlm node` subprocesses on 127.0.0.1, each
  with its own data dir; their printed multiaddrs are read back (the node prints them once
  reachable). `stop()` sends SIGTERM and waits, `kill()` sends SIGKILL; `stop_all` in teardown.
- `pid_alive(pid)`, `wait_until_dead(pids, timeout_s)`, `p2pd_children(pid)`: for checking that
  nothing is left behind.
- `run_cli(*args)`: `python -m swarmlm ...` as a subprocess, returning the CompletedProcess;
  `swarmlm_command(args)` is that command line.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Coroutine, Sequence

from swarmlm.p2p.process import PeerProcess, child_env, open_child
from swarmlm.swarm.client.model import LoopThread as ClientLoopThread

STARTUP_TIMEOUT_S = 120.0      # p2pd plus hivemind's import can take long on a loaded 2-core machine


class LoopThread(ClientLoopThread):
    """The client's loop thread, with a default timeout so a stuck test fails instead of hanging."""

    def run(self, coro: Coroutine[Any, Any, Any], timeout_s: float | None = 120.0) -> Any:
        return super().run(coro, timeout_s)


class NodeProcess(PeerProcess):
    """One `swarmlm node` subprocess on 127.0.0.1 with its own data dir (log: `node.log` in it)."""

    def __init__(self, data_dir: Path, args: Sequence[str] = (), env: dict[str, str] | None = None):
        self.data_dir = Path(data_dir)
        log_path = self.data_dir / "node.log"
        command = swarmlm_command(["node", "--host", "127.0.0.1", "--data-dir", self.data_dir, *args])
        super().__init__(open_child(command, log_path=log_path, env=env), log_path)

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> list[str]:
        return super().wait_ready(timeout_s)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        return super().stop(timeout_s)


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


def swarmlm_command(args: Sequence[str | Path]) -> list[str]:
    """`python -m swarmlm ARGS...` with this interpreter."""
    return [sys.executable, "-m", "swarmlm", *map(str, args)]


def run_cli(*args: str, timeout_s: float = 300.0, env: dict[str, str] | None = None,
            input: bytes | None = None) -> subprocess.CompletedProcess:
    """`python -m swarmlm ARGS` with the test environment; stdout as bytes, stderr as text."""
    proc = subprocess.run(swarmlm_command(args), capture_output=True, timeout=timeout_s,
                          env=child_env(env), input=input)
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


def poll_until(condition: Callable[[], Any], timeout_s: float, *, every_s: float = 0.05) -> Any:
    """`condition()` once it is truthy, or its last (falsy) value after `timeout_s`. For state that
    another process or thread changes and that offers no event to wait on (/proc, a child's
    output read by a reader thread): the caller asserts on the value returned."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()) and time.monotonic() < deadline:
        time.sleep(every_s)
    return value


def wait_until_dead(pids: Sequence[int], timeout_s: float) -> list[int]:
    """Those of `pids` still alive after waiting up to `timeout_s` for all to exit. (They need not
    be our children, so there is nothing to waitpid on.)"""
    poll_until(lambda: not any(pid_alive(p) for p in pids), timeout_s)
    return [p for p in pids if pid_alive(p)]
