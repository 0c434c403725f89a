"""Benchmark: memory per rank of FSDP against DDP, two gloo processes, the `small` preset.

The CPU allocator keeps no peak counter, so the headline number counts bytes resident per
rank for training state after a step: parameters + gradients + AdamW state, counting only
this rank's shard of every DTensor (what FSDP2 keeps between steps). A second number is the
process's peak resident set (ru_maxrss) growth from before building the model to after the
steps, which also includes activations, FSDP's temporarily all-gathered blocks, the full
model every rank builds before sharding it, and allocator slack. Target: FSDP/DDP <= 0.6.

    python bench/parallel_memory.py [--config small] [--steps 2] [--batch-size 2] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from swarmlm.model.config import PRESETS
from swarmlm.parallel.engine import ParallelTrainer
from swarmlm.parallel.mesh import ParallelPlan, build_mesh
from swarmlm.train.config import TrainConfig


def _local_bytes(t) -> int:
    t = getattr(t, "_local_tensor", t)
    return t.numel() * t.element_size()


def state_bytes(trainer: ParallelTrainer) -> dict[str, int]:
    params = {id(p): p for m in trainer.modules for p in m.parameters()}.values()
    out = {"params": sum(_local_bytes(p) for p in params),
           "grads": sum(_local_bytes(p.grad) for p in params if p.grad is not None), "optimizer": 0}
    for opt in trainer.optimizers:
        for st in opt.state.values():
            out["optimizer"] += sum(_local_bytes(v) for v in st.values() if isinstance(v, torch.Tensor))
    return out


def _worker(rank: int, port: int, out: str, plan_kw: dict, config: str, train: TrainConfig) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    cfg, plan = PRESETS[config], ParallelPlan(**plan_kw)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    trainer = ParallelTrainer(cfg, train, plan, mesh=build_mesh(plan, "cpu"))
    g = torch.Generator().manual_seed(0)
    for s in range(train.steps):
        seq = torch.randint(cfg.vocab_size, (train.batch_size, train.seq_len + 1), generator=g)
        trainer.step(s, seq[:, :-1], seq[:, 1:])
    found = state_bytes(trainer)
    found["maxrss_growth"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024  # KiB on Linux
    t = torch.tensor([found[k] for k in sorted(found)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)   # the heaviest rank
    if rank == 0:
        with open(out, "w") as f:
            json.dump(dict(zip(sorted(found), t.tolist())), f)
    dist.destroy_process_group()


def measure(plan_kw: dict, config: str, train: TrainConfig) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = os.path.join(tmp, "mem.json")
        mp.start_processes(_worker, args=(port, out, plan_kw, config, train), nprocs=2, start_method="spawn")
        return json.load(open(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="small", choices=sorted(PRESETS))
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=2, help="global batch")
    p.add_argument("--seq-len", type=int, default=128)
    a = p.parse_args()
    train = TrainConfig(steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len, warmup_steps=0)
    ddp, fsdp = measure({"dp": 2}, a.config, train), measure({"fsdp": 2}, a.config, train)
    state = {k: sum(v for n, v in d.items() if n != "maxrss_growth") for k, d in (("ddp", ddp), ("fsdp", fsdp))}
    common = {"config": a.config, "world": 2, "per": "rank (max over ranks)"}
    rows = [("ddp_state_bytes", state["ddp"], "bytes", "params+grads+AdamW state resident"),
            ("fsdp_state_bytes", state["fsdp"], "bytes", "params+grads+AdamW state resident"),
            ("fsdp_over_ddp_state", state["fsdp"] / state["ddp"], "ratio", "params+grads+AdamW state resident"),
            ("ddp_maxrss_growth", ddp["maxrss_growth"], "bytes", "ru_maxrss growth"),
            ("fsdp_maxrss_growth", fsdp["maxrss_growth"], "bytes", "ru_maxrss growth"),
            ("fsdp_over_ddp_maxrss", fsdp["maxrss_growth"] / max(ddp["maxrss_growth"], 1), "ratio", "ru_maxrss growth")]
    for name, value, unit, method in rows:
        print(json.dumps({"name": f"parallel_memory.{name}", "value": round(value, 4), "unit": unit,
                          "method": method, **common}))


if __name__ == "__main__":
    main()
