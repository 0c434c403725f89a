"""Workers for the multi-process tests: each runs inside every gloo process (tests/helpers/dist.py).

Batches are synthetic and a pure function of the step, so a single process and any layout see
the same global batch.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from swarmlm.model.config import PRESETS
from swarmlm.parallel.engine import ParallelTrainer
from swarmlm.parallel.mesh import ParallelPlan, build_mesh, check_plan
from swarmlm.train.config import TrainConfig
from tests.parallel.workers_cp import RING_CASES, ring_vs_full

# the 2-process layouts, run in one launch (with the checkpoint round trip)
TWO = {
    "dp": dict(dp=2),
    "fsdp": dict(fsdp=2),
    "tp": dict(tp=2),
    "pp-gpipe": dict(pp=2, pp_schedule="gpipe"),
    "pp-1f1b": dict(pp=2, pp_schedule="1f1b"),
    "pp-interleaved-1f1b": dict(pp=2, pp_schedule="interleaved-1f1b"),
    "cp": dict(cp=2),
}

# the 4-process hybrids, run in one launch
FOUR = {
    "dp-x-tp": dict(dp=2, tp=2),
    "fsdp-x-tp": dict(fsdp=2, tp=2),
    "pp-x-dp": dict(pp=2, dp=2),
    "pp-x-tp": dict(pp=2, tp=2),
    "dp-x-cp": dict(dp=2, cp=2),
}

TRAIN = TrainConfig(steps=10, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, seed=0)


def model_config(**changes):
    return dataclasses.replace(PRESETS["tiny"], vocab_size=512, **changes)


def batch(step: int, cfg, train: TrainConfig = TRAIN) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    seq = torch.randint(cfg.vocab_size, (train.batch_size, train.seq_len + 1), generator=g)
    return seq[:, :-1], seq[:, 1:]


def reference_losses(steps: int = 10, **cfg_changes) -> list[float]:
    """The single-process run the parallel layouts must reproduce."""
    cfg = model_config(**cfg_changes)
    trainer = ParallelTrainer(cfg, TRAIN)
    return [trainer.step(s, *batch(s, cfg)) for s in range(steps)]


def run_plans(rank: int, plans: list[dict], steps: int = 10) -> dict[str, list[float]]:
    """For each named plan ({"name":..., "cfg": {...}, plan fields...}): the losses of `steps` steps."""
    out = {}
    for spec in plans:
        spec = dict(spec)
        name, cfg = spec.pop("name"), model_config(**spec.pop("cfg", {}))
        plan = check_plan(cfg, dist.get_world_size(), ParallelPlan(**spec), seq_len=TRAIN.seq_len,
                          batch_size=TRAIN.batch_size)
        trainer = ParallelTrainer(cfg, TRAIN, plan, mesh=build_mesh(plan, "cpu"))
        out[name] = [trainer.step(s, *batch(s, cfg)) for s in range(steps)]
        dist.barrier()
    return out


def save_then_resume(rank: int, ckpt: str, save_at: int = 5, steps: int = 10) -> dict[str, list[float]]:
    """Train `save_at` steps under TP=2 and save; resume under DP=2 for the remaining steps."""
    from swarmlm.parallel.checkpoint import load_checkpoint, save_checkpoint

    cfg, world = model_config(), dist.get_world_size()
    out = {}
    plan = ParallelPlan(tp=2)
    trainer = ParallelTrainer(cfg, TRAIN, plan, mesh=build_mesh(plan, "cpu"))
    out["tp"] = [trainer.step(s, *batch(s, cfg)) for s in range(save_at)]
    save_checkpoint(trainer, ckpt, save_at)
    del trainer
    plan = ParallelPlan(dp=world)
    trainer = ParallelTrainer(cfg, TRAIN, plan, mesh=build_mesh(plan, "cpu"))
    start = load_checkpoint(trainer, ckpt)
    out["dp"] = [trainer.step(s, *batch(s, cfg)) for s in range(start, steps)]
    return out


def run_two_process_suite(rank: int, plans: list[dict], ckpt: str) -> dict:
    """All 2-process layouts, the checkpoint round trip and the ring-attention check, in one launch."""
    out = run_plans(rank, plans)
    out["checkpoint"] = save_then_resume(rank, ckpt)
    out["ring"] = ring_vs_full(rank, RING_CASES)
    return out


def run_four_process_suite(rank: int, plans: list[dict]) -> dict:
    """All 4-process hybrids and the ring-attention check, in one launch."""
    out = run_plans(rank, plans)
    out["ring"] = ring_vs_full(rank, RING_CASES)
    return out
