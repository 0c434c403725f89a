"""Run a function in N gloo processes on 127.0.0.1 and collect what rank 0 returns.

`spawn(fn, n, *args)` starts n processes with torch.multiprocessing (spawn), each joining one
gloo process group on a free loopback port, calls `fn(rank, *args)` and returns rank 0's
JSON-able result. A failure on any rank raises in the caller with that rank's traceback.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from pathlib import Path

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, n: int, port: int, out: str, args: tuple) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(n),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=n)
    try:
        result = fn(rank, *args)
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def spawn(fn, n: int, *args):
    """fn(rank, *args) on n gloo ranks; returns rank 0's result (which must be JSON-able)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.start_processes(_entry, args=(fn, n, free_port(), out, args), nprocs=n, start_method="spawn")
        return json.loads(Path(out).read_text())
