"""The demo's federated step: one short round of secure aggregation with client-level DP among
peers that each keep a private shard of the embedded corpus, over the demo's swarm.

    summary = run_federated_round(model_dir, work_dir, initial_peers=[bootstrap_maddr], n_clients=3)
    # {"clients": 3, "dropped": 0, "epsilon": 2.9, "delta": 1e-05, "val_loss": ..., "seconds": ...}

Peers are started in this process (real hivemind peers joined through `initial_peers`, or
in-memory ones without), so no child process is left behind. Wires privacy/ calls together.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Sequence

from swarmlm.data.corpus import stdlib_root
from swarmlm.demo.summary import Part
from swarmlm.privacy.federated import FlConfig

# small modules of the standard library: each client's private text (a few KB each)
SHARD_FILES = ("textwrap.py", "shlex.py", "fnmatch.py", "bisect.py", "colorsys.py", "glob.py", "heapq.py",
               "queue.py", "sched.py", "graphlib.py", "keyword.py", "string.py")
DP_CLIP, DP_NOISE, DP_DELTA = 1.0, 1.0, 1e-5


def write_shards(directory: Path, n: int) -> list[Path]:
    """`n` disjoint private texts from the standard library, one file per client."""
    directory.mkdir(parents=True, exist_ok=True)
    files = [stdlib_root() / f for f in SHARD_FILES if (stdlib_root() / f).is_file()]
    out = []
    for i in range(n):
        path = directory / f"client{i}.txt"
        path.write_text("\n".join(f.read_text(encoding="utf-8") for f in files[i::n]), encoding="utf-8")
        out.append(path)
    return out


def run_federated_round(model_dir: str | Path, work_dir: str | Path, *, initial_peers: Sequence[str] = (),
                        n_clients: int = 3, rounds: int = 1, local_steps: int = 3) -> dict:
    """Run `rounds` secure, DP rounds over `n_clients` clients; the last round's record, with ε."""
    work = Path(work_dir)
    shards = write_shards(work / "data", n_clients)
    cfg = FlConfig(rounds=rounds, clients_per_round=n_clients, min_clients=min(2, n_clients),
                   local_steps=local_steps, secure=True, dp_clip=DP_CLIP, dp_noise=DP_NOISE, dp_delta=DP_DELTA,
                   round_timeout_s=30.0).check()
    t0 = time.perf_counter()
    records = asyncio.run(_run(Path(model_dir), shards, cfg, work, list(initial_peers)))
    last = dict(records[-1])
    last["seconds_total"] = time.perf_counter() - t0
    return last


async def _run(model_dir: Path, shards: list[Path], cfg: FlConfig, work: Path, initial_peers: list[str]) -> list[dict]:
    from swarmlm.privacy.inprocess import run_in_process
    peers: list = []
    try:
        if initial_peers:
            from swarmlm.p2p.peer import Peer
            peers = list(await asyncio.gather(*[Peer.create(initial_peers=initial_peers, host="127.0.0.1")
                                                for _ in range(len(shards) + 1)]))
        else:
            from swarmlm.p2p.memory import MemoryNetwork, MemoryPeer
            net = MemoryNetwork()
            peers = [await MemoryPeer.create(net) for _ in range(len(shards) + 1)]
        return await run_in_process(peers, model_dir, shards, cfg, run_id="demo-fl", work=work)
    finally:
        await asyncio.gather(*[p.shutdown() for p in peers], return_exceptions=True)


def federated_part(record: dict) -> Part:
    """The summary's line for the round `run_federated_round` returned."""
    eps = record.get("epsilon")
    dp = f"DP ε = {eps:.2f} at δ = {record.get('delta')}" if eps is not None else "no DP"
    line = (f"  federated   round {record['round']}: {record['clients']} clients ({record['dropped']} dropped), "
            f"secure aggregation, {dp}; validation loss {record['val_loss']:.3f} ({record['seconds_total']:.1f} s)")
    found = [] if eps is not None and record["clients"] >= 2 else ["the federated round reported no DP guarantee"]
    return Part("federated", [line], found, record)
