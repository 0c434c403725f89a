"""Benchmark: peak memory per rank of FSDP against DDP, two gloo processes, the `small` preset.

Two measures, both the heaviest rank's:

- state bytes: parameters + gradients + AdamW state resident after the steps, counting only
  this rank's piece of every DTensor (what FSDP2 keeps between steps);
- peak resident set growth (ru_maxrss, the kernel's high-water mark of the process's RSS) from
  just before the model is built to after the steps: everything the rank ever held at once,
  including activations, FSDP's all-gathered blocks, DDP's gradient buckets and the model
  build (a meta-device shell; each rank allocates only its own shards, see
  parallel/materialize.py). Before the baseline each rank runs the same plan on the `tiny`
  preset, so lazily imported code and the process group's buffers count on neither side.

The RSS is measured twice: with glibc's default malloc, which after the first large free
raises its mmap threshold (up to 32 MiB) and then keeps freed multi-MiB buffers in its heaps,
so the RSS peak also counts allocator retention; and with MALLOC_MMAP_THRESHOLD_ fixed at
1 MiB, so every large tensor is mapped and unmapped on its own and the RSS peak follows the
bytes actually live. Target: FSDP/DDP <= 0.6.

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


def _train(trainer: ParallelTrainer, cfg, train: TrainConfig) -> None:
    g = torch.Generator().manual_seed(0)
    for s in range(train.steps):
        seq = torch.randint(cfg.vocab_size, (train.batch_size, train.seq_len + 1), generator=g)
        trainer.step(s, seq[:, :-1], seq[:, 1:])


def _worker(rank: int, port: int, out: str, plan_kw: dict, config: str, train: TrainConfig) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    cfg, plan = PRESETS[config], ParallelPlan(**plan_kw)
    mesh = build_mesh(plan, "cpu")
    _train(ParallelTrainer(PRESETS["tiny"], train, plan, mesh=mesh), PRESETS["tiny"], train)   # warm-up
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    trainer = ParallelTrainer(cfg, train, plan, mesh=mesh)
    _train(trainer, cfg, train)
    found = state_bytes(trainer)
    found["maxrss_growth"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024  # KiB on Linux
    t = torch.tensor([found[k] for k in sorted(found)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)   # the heaviest rank
    if rank == 0:
        with open(out, "w") as f:
            json.dump(dict(zip(sorted(found), t.tolist())), f)
    dist.destroy_process_group()


def measure(plan_kw: dict, config: str, train: TrainConfig, env: dict[str, str]) -> dict[str, float]:
    """Spawn the two ranks with `env` added to their environment (malloc reads it at start)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            out = os.path.join(tmp, "mem.json")
            mp.start_processes(_worker, args=(port, out, plan_kw, config, train), nprocs=2, start_method="spawn")
            return json.load(open(out))
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


MALLOC = {"glibc_default": {}, "mmap_1mib": {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="small", choices=sorted(PRESETS))
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=2, help="global batch")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--malloc", default="both", choices=["both", *MALLOC], help="allocator setting(s) to run")
    a = p.parse_args()
    train = TrainConfig(steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len, warmup_steps=0)
    common = {"config": a.config, "world": 2, "per": "rank (max over ranks)"}

    def emit(name, value, unit, method):
        print(json.dumps({"name": f"parallel_memory.{name}", "value": round(value, 4), "unit": unit,
                          "method": method, **common}), flush=True)

    for i, malloc in enumerate(MALLOC if a.malloc == "both" else [a.malloc]):
        ddp = measure({"dp": 2}, a.config, train, MALLOC[malloc])
        fsdp = measure({"fsdp": 2}, a.config, train, MALLOC[malloc])
        if i == 0:
            state = {k: sum(v for n, v in d.items() if n != "maxrss_growth") for k, d in (("ddp", ddp), ("fsdp", fsdp))}
            what = "params+grads+AdamW state resident"
            emit("ddp_state_bytes", state["ddp"], "bytes", what)
            emit("fsdp_state_bytes", state["fsdp"], "bytes", what)
            emit("fsdp_over_ddp_state", state["fsdp"] / state["ddp"], "ratio", what)
        what = f"ru_maxrss growth, malloc {malloc}"
        emit(f"ddp_maxrss_growth_{malloc}", ddp["maxrss_growth"], "bytes", what)
        emit(f"fsdp_maxrss_growth_{malloc}", fsdp["maxrss_growth"], "bytes", what)
        emit(f"fsdp_over_ddp_maxrss_{malloc}", fsdp["maxrss_growth"] / max(ddp["maxrss_growth"], 1), "ratio", what)


if __name__ == "__main__":
    main()
