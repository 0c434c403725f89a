"""The parallel plan: degrees per technique, the check that refuses impossible plans, the device mesh.

A `ParallelPlan` names how many ranks each technique spans; their product is the world size.
`check_plan` is a pure function of the model config, the world size and the plan, and runs
before any process group exists, so a bad plan fails with one clear line instead of a hang.
`build_mesh` turns a checked plan into a `DeviceMesh` whose dimensions are named after the
techniques, outermost first: ("pp", "dp", "fsdp", "cp", "tp"). TP is innermost because it
talks on every matmul and belongs on the fastest links; PP is outermost because it talks least.
Knows nothing of the model's modules: only its head, layer and width counts.
"""

from __future__ import annotations

from dataclasses import dataclass

from swarmlm.errors import PlanError
from swarmlm.model.config import ModelConfig

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b")
MESH_DIMS = ("pp", "dp", "fsdp", "cp", "tp")


@dataclass(frozen=True)
class ParallelPlan:
    dp: int = 1                 # replicas that all-reduce gradients (DDP; with fsdp > 1 the replicate side of HSDP)
    fsdp: int = 1               # ranks sharding parameters, gradients and optimizer state (FSDP2, ZeRO-3)
    tp: int = 1                 # ranks splitting every matmul (Megatron column/row splits on DTensor)
    pp: int = 1                 # pipeline ranks, each holding consecutive blocks
    cp: int = 1                 # ranks splitting the sequence (ring attention)
    pp_schedule: str = "1f1b"   # gpipe | 1f1b | interleaved-1f1b
    n_microbatches: int = 0     # micro-batches per step and pipeline; 0 picks the number of pipeline stages
    sequence_parallel: bool = True  # with tp > 1: norms and residuals sharded along the sequence

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.fsdp * self.cp * self.tp

    @property
    def batch_degree(self) -> int:
        """Ranks that see different rows of the global batch."""
        return self.dp * self.fsdp

    @property
    def stages_per_rank(self) -> int:
        return 2 if self.pp > 1 and self.pp_schedule == "interleaved-1f1b" else 1

    @property
    def n_stages(self) -> int:
        return self.pp * self.stages_per_rank

    @property
    def microbatches(self) -> int:
        return self.n_microbatches or self.n_stages

    def describe(self) -> str:
        return " x ".join(f"{name}={getattr(self, name)}" for name in MESH_DIMS)


def check_plan(cfg: ModelConfig, world_size: int, plan: ParallelPlan, *, seq_len: int, batch_size: int,
               cp_chunks_per_rank: int = 1) -> ParallelPlan:
    """Raise PlanError naming the first reason `plan` cannot run; return the plan so it chains.

    batch_size is the global batch (rows per optimizer step, across all ranks). cp_chunks_per_rank
    is 2 where torch's load-balanced context parallel cuts the sequence into 2 * cp pieces.
    """
    for name in MESH_DIMS:
        value = getattr(plan, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PlanError(f"--{name} must be a positive integer, got {value!r}")
    if plan.pp_schedule not in SCHEDULES:
        raise PlanError(f"--pp-schedule must be one of {', '.join(SCHEDULES)}, got {plan.pp_schedule!r}")
    _check_tp(cfg, plan, seq_len)
    _check_pp(cfg, plan, batch_size)
    if batch_size % plan.batch_degree:
        raise PlanError(f"the global batch of {batch_size} rows does not split over dp x fsdp = "
                        f"{plan.batch_degree} ranks; use a multiple of {plan.batch_degree}")
    if plan.cp > 1:
        pieces = plan.cp * cp_chunks_per_rank * (plan.tp if plan.tp > 1 and plan.sequence_parallel else 1)
        if seq_len % pieces:
            raise PlanError(f"--cp {plan.cp} cannot split a sequence of {seq_len} tokens into {pieces} equal "
                            f"pieces; use a --seq-len that is a multiple of {pieces}")
        if plan.pp > 1:
            raise PlanError("context parallel together with pipeline parallel is not supported; "
                            "drop --cp or --pp")
        if seq_len // pieces < 2:
            raise PlanError(f"--cp {plan.cp} leaves fewer than 2 tokens per rank of a {seq_len}-token sequence")
        if plan.dp > 1 and (plan.fsdp > 1 or plan.tp > 1):
            raise PlanError("--cp with --dp > 1 works with plain DDP only; with --fsdp or --tp "
                            "use --fsdp for the data-parallel ranks instead of --dp")
    # last: a plan the model cannot take is named as such, whatever the world size
    if plan.world_size != world_size:
        raise PlanError(f"the mesh {plan.describe()} needs {plan.world_size} processes, but the world has "
                        f"{world_size} (torchrun --nproc-per-node); make the degrees multiply to {world_size}")
    return plan


def _check_tp(cfg: ModelConfig, plan: ParallelPlan, seq_len: int) -> None:
    tp = plan.tp
    if tp == 1:
        return
    for what, count in (("attention heads", cfg.n_heads), ("key/value heads", cfg.n_kv_heads),
                        ("MLP hidden units (ffn_dim)", cfg.ffn_dim), ("vocabulary rows", cfg.vocab_size)):
        if count % tp:
            raise PlanError(f"--tp {tp} does not divide the model's {count} {what}; "
                            f"use a tp degree that divides {count}")
    if plan.sequence_parallel and seq_len % tp:
        raise PlanError(f"sequence parallel with --tp {tp} needs a sequence length divisible by {tp}, "
                        f"got {seq_len}")
    if cfg.family == "gpt2" and plan.sequence_parallel:
        raise PlanError("tensor parallel with sequence parallel supports the llama family only")


def _check_pp(cfg: ModelConfig, plan: ParallelPlan, batch_size: int) -> None:
    if plan.pp == 1:
        return
    if plan.n_stages > cfg.n_layers:
        raise PlanError(f"{plan.n_stages} pipeline stages (--pp {plan.pp}, schedule {plan.pp_schedule}) but the "
                        f"model has only {cfg.n_layers} layers; every stage needs at least one layer")
    local = batch_size // plan.batch_degree if batch_size % plan.batch_degree == 0 else batch_size
    n_mb = plan.microbatches
    if local % n_mb:
        raise PlanError(f"each pipeline gets {local} rows per step, which do not split into {n_mb} micro-batches")
    if plan.pp_schedule == "interleaved-1f1b" and n_mb % plan.pp:
        raise PlanError(f"interleaved 1F1B needs micro-batches ({n_mb}) to be a multiple of --pp {plan.pp}")


def split_layers(n_layers: int, n_stages: int) -> list[range]:
    """Consecutive layer ranges, one per stage, sizes differing by at most one (earlier stages
    get the extra layers: the last stage also holds the lm head)."""
    base, extra = divmod(n_layers, n_stages)
    bounds, start = [], 0
    for s in range(n_stages):
        size = base + (1 if s < extra else 0)
        bounds.append(range(start, start + size))
        start += size
    return bounds


class Mesh:
    """The root DeviceMesh and its flattened dimensions, each reachable by name:
    mesh["tp"], mesh["dp", "fsdp"], mesh["batch"]."""

    def __init__(self, root, flat: dict):
        self.root, self.flat = root, flat

    def __getitem__(self, names):
        if isinstance(names, str) and names in self.flat:
            return self.flat[names]
        return self.root[names]


def build_mesh(plan: ParallelPlan, device_type: str) -> Mesh:
    """A DeviceMesh with dimensions MESH_DIMS (size-1 dimensions kept, so `mesh["tp"]` always
    exists), plus flattened dimensions: "batch" (dp, fsdp), the ranks that see different rows;
    "grad" (dp, fsdp, cp), the ranks whose gradients are averaged; "fsdp_cp", the ranks FSDP
    shards over (context-parallel ranks hold the same parameters, so they share the sharding)."""
    from torch.distributed.device_mesh import init_device_mesh

    shape = tuple(getattr(plan, name) for name in MESH_DIMS)
    root = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)
    flat = {"batch": root["dp", "fsdp"]._flatten("batch"), "grad": root["dp", "fsdp", "cp"]._flatten("grad"),
            "fsdp_cp": root["fsdp", "cp"]._flatten("fsdp_cp")}
    return Mesh(root, flat)
