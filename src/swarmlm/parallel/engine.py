"""ParallelTrainer: one model under a parallel plan, and one optimizer step on a global batch.

It builds the model on the meta device (no rank holds it whole), applies the plan from
outside in torchtitan's order: cut pipeline stages, tensor parallel, context parallel, FSDP2
over the ranks that shard; then allocates only this rank's pieces and fills them with the
weights a single process gets from the run's seed (materialize.py), so all layouts start from
the same model; plain replicas are wrapped in DDP last. `step` takes the *global* batch,
picks this rank's rows (dp, fsdp) and sequence slice (cp), and returns the global mean loss,
the same number a single process gets for the same batch. With the all-ones plan and no
process group it is the single-process reference. Knows nothing of where batches come from.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from swarmlm.model.config import ModelConfig
from swarmlm.parallel.cp import apply_cp, cp_context
from swarmlm.parallel.ddp import apply_ddp
from swarmlm.parallel.fsdp import apply_fsdp
from swarmlm.parallel.materialize import build_shell, materialize
from swarmlm.parallel.mesh import ParallelPlan
from swarmlm.parallel.pp import Pipeline, cut_stage, lm_loss, stage_ids, sync_tied_grads, tied_group
from swarmlm.parallel.tp import apply_tp
from swarmlm.train.config import TrainConfig
from swarmlm.train.optim import build_optimizer, lr_at, set_lr


class ParallelTrainer:
    def __init__(self, cfg: ModelConfig, train: TrainConfig, plan: ParallelPlan = ParallelPlan(), *,
                 mesh=None, device: torch.device | str = "cpu", param_dtype: torch.dtype | None = None):
        self.cfg, self.train, self.plan, self.mesh = cfg, train, plan, mesh
        self.device = torch.device(device)
        torch.manual_seed(train.seed)
        shell = build_shell(cfg)                                                 # meta: shapes only
        pp_rank = mesh["pp"].get_local_rank() if plan.pp > 1 else 0
        self.stage_ids = stage_ids(plan, pp_rank) if plan.pp > 1 else [0]
        # the plan changes the parts in place; the shell stays the plain model materialize walks
        parts = [cut_stage(shell, s, plan.n_stages) for s in self.stage_ids] if plan.pp > 1 else [copy.deepcopy(shell)]
        self.modules = [self._shard(p, param_dtype) for p in parts]             # the Transformers
        materialize(self.modules, shell, self.device)                            # this rank's pieces only
        self.parts = [self._replicate(m, param_dtype) for m in self.modules]    # what we call (maybe DDP)
        self.optimizers = [build_optimizer(m, train) for m in self.modules]
        self.pipeline = Pipeline(self.parts, self.stage_ids, plan, mesh["pp"], self.device) if plan.pp > 1 else None
        self._tied_group = None
        if plan.pp > 1 and cfg.tie_embeddings:
            self._tied_group = tied_group(mesh, plan)

    def _shard(self, model: nn.Module, param_dtype) -> nn.Module:
        """Tensor, context and sharded data parallel, applied in place to a meta-device model."""
        plan, mesh = self.plan, self.mesh
        if mesh is None:
            return model
        if plan.tp > 1:
            apply_tp(model, mesh["tp"], sequence_parallel=plan.sequence_parallel)
        if plan.cp > 1:
            apply_cp(model, mesh["cp"])
        if self._uses_ddp(param_dtype) or (param_dtype is None and plan.batch_degree * plan.cp == 1):
            return model
        # (mixed precision is FSDP2's policy: asked for, FSDP2 runs even over a single rank)
        # FSDP2 shards over fsdp x cp; dp > 1 adds a replicate dimension (HSDP). With fsdp == 1
        # that is plain replication: DDP's job, done by FSDP2 where DDP cannot go (DTensor
        # parameters under tp; several forwards before a backward under pp).
        dp_mesh = mesh["dp", "fsdp"] if plan.dp > 1 else mesh["fsdp_cp"]  # cp == 1 when dp > 1 (check_plan)
        return apply_fsdp(model, dp_mesh, param_dtype=param_dtype, reshard_after_forward=plan.pp == 1)

    def _uses_ddp(self, param_dtype) -> bool:
        plan = self.plan
        return (self.mesh is not None and param_dtype is None and plan.fsdp == 1 and plan.tp == 1
                and plan.pp == 1 and plan.dp * plan.cp > 1)

    def _replicate(self, model: nn.Module, param_dtype) -> nn.Module:
        """DDP around a materialized model where the plan is plain replicas (it broadcasts rank
        0's weights at wrap time, so it cannot go on the meta device)."""
        return apply_ddp(model, self.mesh["grad"]) if self._uses_ddp(param_dtype) else model

    # ---- one step -------------------------------------------------------------------------

    def local_rows(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global (B, T) batch."""
        if self.plan.batch_degree == 1:
            return batch
        return batch.chunk(self.plan.batch_degree, dim=0)[self.mesh["batch"].get_local_rank()]

    def step(self, step: int, tokens: torch.Tensor, targets: torch.Tensor) -> float:
        """One optimizer step on the global batch tokens/targets (B, T); returns the global loss."""
        for opt in self.optimizers:
            set_lr(opt, lr_at(step, self.train))
            opt.zero_grad(set_to_none=True)
        tokens = self.local_rows(tokens).to(self.device)
        targets = self.local_rows(targets).to(self.device)
        if self.pipeline is not None:
            loss = self.pipeline.step(tokens, targets)
        else:
            with cp_context(self.mesh["cp"] if self.plan.cp > 1 else _NoMesh(), tokens, targets) as (tok, tgt, pos):
                loss = lm_loss(self.parts[0](tok, positions=pos), tgt)
                loss.backward()
        if self._tied_group is not None:
            sync_tied_grads(self._tied_params(), self._tied_group)
        if self.train.grad_clip > 0:
            self.clip_grads(self.train.grad_clip)
        for opt in self.optimizers:
            opt.step()
        return self._global_loss(loss)

    def _tied_params(self) -> list[nn.Parameter]:
        out = []
        for m, s in zip(self.modules, self.stage_ids):
            if s == 0 and m.tok_embeddings is not None:
                out.append(m.tok_embeddings.weight)
            elif s == self.plan.n_stages - 1 and m.output is not None:
                out.append(m.output.weight)
        return out

    def clip_grads(self, max_norm: float) -> float:
        """Scale all gradients so their global 2-norm is at most max_norm; returns the norm."""
        skip = set()
        if self._tied_group is not None and self.plan.n_stages - 1 in self.stage_ids:
            skip = {id(p) for p in self._tied_params()}   # counted on the first stage only
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        grads = []
        for m in self.modules:
            for p in m.parameters():
                if p.grad is None:
                    continue
                grads.append(p.grad)
                if id(p) in skip:
                    continue
                n = torch.linalg.vector_norm(p.grad.float())
                sq += (n.full_tensor() if isinstance(n, DTensor) else n).double() ** 2
        if self.plan.pp > 1:
            dist.all_reduce(sq, group=self.mesh["pp"].get_group())
        norm = math.sqrt(sq.item())
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            torch._foreach_mul_(grads, coef) if not any(isinstance(g, DTensor) for g in grads) else \
                [g.mul_(coef) for g in grads]
        return norm

    def _global_loss(self, loss: torch.Tensor | None) -> float:
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return float(loss.detach())
        t = torch.tensor(float(loss.detach()) if loss is not None else 0.0, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / (dist.get_world_size() // self.plan.pp)   # ranks holding a loss (last stage)


class _NoMesh:
    def size(self) -> int:
        return 1
