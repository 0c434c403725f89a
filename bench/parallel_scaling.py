"""Benchmark: training tokens/s of DP=2 (two gloo processes) against one process.

Both sides run in this one invocation with the same per-rank work (one process: batch B;
DP=2: global batch 2B, B rows per rank), so the scaling efficiency is
tokens/s(DP=2) / (2 * tokens/s(one process)). On a machine with fewer free cores than
processes the efficiency mostly measures core contention, not communication.

    python bench/parallel_scaling.py [--config tiny] [--steps 20] [--batch-size 8] [--seq-len 128]

Prints one JSON line per result.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from swarmlm.model.config import PRESETS
from swarmlm.parallel.engine import ParallelTrainer
from swarmlm.parallel.mesh import ParallelPlan, build_mesh
from swarmlm.train.config import TrainConfig


def step_times(cfg, train: TrainConfig, plan: ParallelPlan, mesh, steps: int, warmup: int = 2) -> list[float]:
    trainer = ParallelTrainer(cfg, train, plan, mesh=mesh)
    g = torch.Generator().manual_seed(0)
    times = []
    for s in range(steps + warmup):
        seq = torch.randint(cfg.vocab_size, (train.batch_size, train.seq_len + 1), generator=g)
        t0 = time.perf_counter()
        trainer.step(s, seq[:, :-1], seq[:, 1:])
        if s >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def _worker(rank: int, world: int, port: int, out: str, cfg, train, steps: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    plan = ParallelPlan(dp=world)
    times = step_times(cfg, train, plan, build_mesh(plan, "cpu"), steps)
    t = torch.tensor(times)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)   # a step ends when its slowest rank does
    if rank == 0:
        with open(out, "w") as f:
            json.dump(t.tolist(), f)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8, help="rows per rank")
    p.add_argument("--seq-len", type=int, default=128)
    a = p.parse_args()
    cfg = dataclasses.replace(PRESETS[a.config], max_seq_len=max(a.seq_len, PRESETS[a.config].max_seq_len))
    one = TrainConfig(steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len, warmup_steps=0)
    two = dataclasses.replace(one, batch_size=2 * a.batch_size)

    torch.set_num_threads(1)
    single = statistics.median(step_times(cfg, one, ParallelPlan(), None, a.steps))
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        out = os.path.join(tmp, "times.json")
        mp.start_processes(_worker, args=(2, port, out, cfg, two, a.steps), nprocs=2, start_method="spawn")
        dp2 = statistics.median(json.load(open(out)))

    tok1 = one.batch_size * one.seq_len / single
    tok2 = two.batch_size * two.seq_len / dp2
    for name, value, unit in (("one_process_tokens_per_s", tok1, "tokens/s"), ("dp2_tokens_per_s", tok2, "tokens/s"),
                              ("dp2_speedup", tok2 / tok1, "ratio"),
                              ("dp2_scaling_efficiency", tok2 / (2 * tok1), "ratio"),
                              ("cpu_cores", os.cpu_count(), "cores")):
        print(json.dumps({"name": f"parallel_scaling.{name}", "value": round(value, 4), "unit": unit,
                          "config": a.config, "batch_per_rank": a.batch_size, "seq_len": a.seq_len,
                          "steps": a.steps, "stat": "median"}))


if __name__ == "__main__":
    main()
