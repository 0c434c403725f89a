"""Sharded data parallel (ZeRO-3) with FSDP2's `fully_shard`.

Each block is its own FSDP unit (its parameters all-gathered just before it runs, freed
after), then the root takes the rest (embeddings, final norm, head). On a 2-D mesh
(replicate, shard) this is HSDP: sharded within a group, replicated across groups. Mixed
precision computes in `param_dtype` and reduces gradients in float32 where the device has a
fast low-precision path (CUDA bf16); on CPU everything stays float32. Knows only that the
model keeps its blocks in `model.layers`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def default_param_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 where the device computes it natively, else None (no mixed precision)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def apply_fsdp(model: nn.Module, mesh, *, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype = torch.float32, reshard_after_forward: bool = True) -> nn.Module:
    """Shard `model` in place over `mesh` (1-D: FSDP; 2-D (replicate, shard): HSDP); returns it.

    reshard_after_forward=False keeps gathered parameters between forward and backward (the
    pipeline sets it, to avoid one all-gather per micro-batch).
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype if param_dtype else None)
    for block in model.layers.values():
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    return model
