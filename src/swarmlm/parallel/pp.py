"""Pipeline parallel on `torch.distributed.pipelining`: stages cut from a built Transformer.

A stage is a copy of the whole model with the parts it does not hold deleted: blocks outside
its layer range, the embeddings unless it is the first stage, the final norm and head unless
it is the last. Blocks keep their absolute index as their key, so parameter names (and
checkpoints) are the same under every layout. Rank r of the "pp" mesh dimension holds stage
r, or stages r and r + pp under interleaved 1F1B (the "looped" assignment the schedule
expects). The schedule splits each batch into micro-batches and runs GPipe (all forwards,
then all backwards), 1F1B (PipeDream-flush: one forward, one backward in the steady state) or
interleaved 1F1B (several smaller stages per rank, fewer idle bubbles).

With tied embeddings the first and last stage hold two copies of one matrix; after each
backward their gradients are summed between the two ranks (`sync_tied_grads`), so both
copies take the same optimizer step and stay equal. Knows nothing of the data or optimizer.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from swarmlm.parallel.mesh import ParallelPlan, split_layers

SCHEDULE_CLASSES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved-1f1b": ScheduleInterleaved1F1B}


def stage_ids(plan: ParallelPlan, pp_rank: int) -> list[int]:
    """Stage indices held by pipeline rank `pp_rank` (looped: r, r + pp, ...)."""
    return [pp_rank + i * plan.pp for i in range(plan.stages_per_rank)]


def cut_stage(model: nn.Module, stage: int, n_stages: int) -> nn.Module:
    """A copy of `model` holding only stage `stage` of `n_stages` (the original is untouched)."""
    keep = split_layers(len(model.layers), n_stages)[stage]
    keys = list(model.layers.keys())
    part = copy.deepcopy(model)
    for i, key in enumerate(keys):
        if i not in keep:
            del part.layers[key]
    if stage != 0:
        part.tok_embeddings = None
        part.pos_embeddings = None
    if stage != n_stages - 1:
        part.norm = None
        part.output = None
    return part


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


class Pipeline:
    """This rank's stages and the schedule that runs them."""

    def __init__(self, modules: list[nn.Module], ids: list[int], plan: ParallelPlan, pp_mesh,
                 device: torch.device):
        self.ids, self.n_stages = ids, plan.n_stages
        group = pp_mesh.get_group()
        self.stages = [PipelineStage(m, i, plan.n_stages, device, group=group) for m, i in zip(modules, ids)]
        cls = SCHEDULE_CLASSES[plan.pp_schedule]
        arg = self.stages if plan.pp_schedule == "interleaved-1f1b" else self.stages[0]
        self.schedule = cls(arg, plan.microbatches, loss_fn=lm_loss)

    @property
    def has_first(self) -> bool:
        return 0 in self.ids

    @property
    def has_last(self) -> bool:
        return self.n_stages - 1 in self.ids

    def step(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """Forward and backward over all micro-batches; the mean loss on the last stage's rank,
        None elsewhere. Gradients are scaled by 1/micro-batches, so they equal the full batch's."""
        losses: list[torch.Tensor] = []
        args = (tokens,) if self.has_first else ()
        kwargs = {"target": targets, "losses": losses} if self.has_last else {}
        self.schedule.step(*args, **kwargs)
        return torch.stack(losses).mean() if self.has_last else None


def tied_group(mesh, plan: ParallelPlan):
    """The group joining this rank with its twin (same dp/fsdp/cp/tp coordinates) at the other
    end of the pipeline, or None for a rank in between. Every rank creates every pair group (a
    collective call). Not the "pp" group itself: the schedule may still have sends in flight
    there when the step's backward ends."""
    ranks = mesh.root.mesh  # (pp, dp, fsdp, cp, tp) global ranks
    mine = None
    for a, b in zip(ranks[0].flatten().tolist(), ranks[-1].flatten().tolist()):
        group = dist.new_group([a, b])
        if dist.get_rank() in (a, b):
            mine = group
    return mine


def sync_tied_grads(params: list[nn.Parameter], group) -> None:
    """Sum the gradients of the tied embedding/head copies between the two pipeline ends."""
    for p in params:
        if p.grad is None:
            continue
        if isinstance(p.grad, DTensor) and p.grad.placements != p.placements:
            # e.g. a vocab-sharded embedding's gradient comes back replicated; the twin's is sharded
            p.grad = p.grad.redistribute(p.device_mesh, p.placements)
        g = p.grad._local_tensor if isinstance(p.grad, DTensor) else p.grad   # in place, on this rank's shard
        dist.all_reduce(g, group=group)
