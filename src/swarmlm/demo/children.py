"""The demo's `swarmlm <verb>` children: this checkout's `swarmlm` command as a child process.

`swarmlm_command(["node", ...])` is the command line; `start_peer_process(["node", ...])` starts
it through p2p/process.py (which knows nothing of the verbs) and waits for its multiaddrs. Block
servers are started by `swarm.server.serve.start_server_process`, which owns `swarmlm serve`.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from swarmlm.p2p.process import PeerProcess, start_child


def swarmlm_command(args: Sequence[str | os.PathLike]) -> list[str]:
    """`python -m swarmlm ARGS...` with the interpreter running this process."""
    return [sys.executable, "-m", "swarmlm", *map(str, args)]


def start_peer_process(args: Sequence[str | os.PathLike], *, log_path: str | os.PathLike,
                       env: dict[str, str] | None = None, wait: bool = True, timeout_s: float = 120.0) -> PeerProcess:
    """Start `swarmlm ARGS...` (stderr to `log_path`) and, by default, wait for its multiaddrs."""
    return start_child(swarmlm_command(args), log_path=log_path, env=env, wait=wait, timeout_s=timeout_s)
