"""`swarmlm train` under torchrun: read the plan from flags, check it, build the mesh, train.

    torchrun --nproc-per-node 4 -m swarmlm train --config tiny --tp 2 --dp 2 --out runs/x

The plan is checked against the model config and WORLD_SIZE before any process group exists,
so a bad plan ends with one clear line on every rank. Data comes from the single-process
loop's `prepare_data` and `Batches` (rank 0 builds the tokenizer and token caches first, the
others then open them), and a step's global batch is the one the single-process loop would
use: `grad_accum` micro-batches of `batch_size` rows, stacked. Rank 0 writes
`metrics.jsonl`; every rank writes its share of the distributed checkpoint under `OUT/dcp`,
and rank 0 exports the HF-format model into OUT at the end. Knows nothing of how each
technique works: that is engine.py and the apply_* modules.
"""

from __future__ import annotations

import ctypes
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from swarmlm.errors import PlanError
from swarmlm.log import get_logger
from swarmlm.train.loop import keep_metrics_up_to
from swarmlm.parallel.mesh import MESH_DIMS, ParallelPlan, build_mesh, check_plan

log = get_logger(__name__)
DCP_DIR = "dcp"


def plan_from_args(args, world_size: int) -> ParallelPlan:
    """Degrees from --dp/--fsdp/--tp/--pp/--cp; with none given, every process is a DP replica."""
    given = {name: getattr(args, name, None) for name in MESH_DIMS}
    if all(v is None for v in given.values()):
        given["dp"] = world_size
    degrees = {k: (1 if v is None else v) for k, v in given.items()}
    return ParallelPlan(**degrees, pp_schedule=getattr(args, "pp_schedule", None) or "1f1b",
                        n_microbatches=getattr(args, "microbatches", None) or 0)


def wants_parallel(args) -> bool:
    """Whether `swarmlm train` should go through this module (torchrun, or any degree other than
    1 given: a bad one, like --tp 0, must reach check_plan rather than be ignored)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return True
    return any(getattr(args, name, None) not in (None, 1) for name in MESH_DIMS)


def run_parallel_training(args) -> int:
    """The `swarmlm train` verb in a torchrun process (or alone, for a 1-process plan)."""
    from swarmlm.train.config import load_run_config

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    run = load_run_config(args.config, steps=args.steps, seed=args.seed, batch_size=args.batch_size,
                          seq_len=args.seq_len)
    plan = plan_from_args(args, world)
    device = _device()
    chunks = 2 if device.type == "cuda" else 1
    global_batch = run.train.batch_size * run.train.grad_accum
    check_plan(run.model, world, plan, seq_len=run.train.seq_len, batch_size=global_batch, cp_chunks_per_rank=chunks)
    if world > 1 and "MASTER_ADDR" not in os.environ:
        raise PlanError("WORLD_SIZE is set but MASTER_ADDR is not; start the processes with torchrun")
    out = Path(args.out or f"runs/{Path(args.config).stem}")
    if device.type == "cpu":
        return_large_buffers_to_the_os()
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    try:
        return _train(args, run, plan, device, out, rank, chunks, global_batch)
    finally:
        dist.destroy_process_group()


def _device() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _train(args, run, plan: ParallelPlan, device: torch.device, out: Path, rank: int, chunks: int,
           global_batch: int) -> int:
    from swarmlm.data.shards import Batches
    from swarmlm.parallel.checkpoint import export_hf, load_checkpoint, save_checkpoint
    from swarmlm.parallel.engine import ParallelTrainer
    from swarmlm.parallel.fsdp import default_param_dtype
    from swarmlm.train.loop import prepare_data
    from swarmlm.train.optim import lr_at

    cfg = run.train
    progress = rank == 0 and not getattr(args, "no_progress", False)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    prep = None
    for turn in (0, 1):   # rank 0 trains the tokenizer and fills the token cache, then the rest open it
        if (rank == 0) == (turn == 0):
            prep = prepare_data(run, args.data, tokenizer_dir=out if args.resume else None, progress=progress)
        dist.barrier()
    model_cfg = prep.model_cfg
    check_plan(model_cfg, dist.get_world_size(), plan, seq_len=cfg.seq_len, batch_size=global_batch,
               cp_chunks_per_rank=chunks)   # again: the tokenizer set the vocabulary size
    mesh = build_mesh(plan, device.type)
    trainer = ParallelTrainer(model_cfg, cfg, plan, mesh=mesh, device=device,
                              param_dtype=default_param_dtype(device) if plan.fsdp > 1 else None)
    ckpt = out / DCP_DIR
    start = load_checkpoint(trainer, ckpt) if args.resume and ckpt.is_dir() else 0
    batches = Batches(prep.shards.train, cfg.batch_size, cfg.seq_len, cfg.seed)
    if rank == 0:
        keep_metrics_up_to(out / "metrics.jsonl", start)   # a resumed run rewrites the steps after its checkpoint
    metrics = open(out / "metrics.jsonl", "a", encoding="utf-8") if rank == 0 else None
    tokens_per_step = global_batch * cfg.seq_len
    try:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            pairs = [batches.get(step, micro) for micro in range(cfg.grad_accum)]
            tokens = torch.cat([x for x, _ in pairs])   # (grad_accum * B, T)
            targets = torch.cat([y for _, y in pairs])
            loss = trainer.step(step, tokens, targets)
            if metrics is not None:
                record = {"step": step + 1, "loss": loss, "lr": lr_at(step, cfg),
                          "tokens_per_s": tokens_per_step / (time.perf_counter() - t0), "plan": plan.describe()}
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                if progress:
                    print(f"step {step + 1}/{cfg.steps} loss {loss:.4f}", flush=True)
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                save_checkpoint(trainer, ckpt, step + 1)
    finally:
        if metrics is not None:
            metrics.close()
    save_checkpoint(trainer, ckpt, cfg.steps)
    export_hf(model_cfg, ckpt, out, tokenizer=prep.tokenizer)
    if rank == 0:
        log.info("trained %d steps under %s; model in %s", cfg.steps, plan.describe(), out)
    return 0


def return_large_buffers_to_the_os(threshold_bytes: int = 1 << 20) -> None:
    """Serve allocations above 1 MiB with mmap, so freed activations and gradient buckets go back to
    the OS: glibc's default keeps them, which hides FSDP's memory saving (0.90 of DDP's peak RSS
    on the `small` preset with the default, 0.58 with this; bench/parallel_memory.py)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:          # not glibc: nothing to tune
        return
    m_mmap_threshold = -3    # mallopt parameter from malloc.h
    libc.mallopt(m_mmap_threshold, threshold_bytes)
