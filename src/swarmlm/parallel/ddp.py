"""Data parallel: every rank holds the whole model and gradients are all-reduced (DDP).

Plain replicas use torch's DistributedDataParallel, whose bucketed all-reduce overlaps the
backward. With tensor parallel the parameters are DTensors, which DDP does not take; there the
replicas are made by FSDP2 over a (replicate, shard=1) mesh, which all-reduces the same
gradients and keeps parameters as DTensors for checkpoints (see fsdp.py). Knows nothing of
the model's structure.
"""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel


def apply_ddp(model: nn.Module, dp_mesh) -> nn.Module:
    """Wrap `model` so its gradients are averaged over the ranks of the 1-D `dp_mesh`.

    Returns the wrapper (call it instead of `model`); parameters are shared with `model`.
    """
    device = next(model.parameters()).device
    return DistributedDataParallel(model, process_group=dp_mesh.get_group(),
                                   device_ids=[device] if device.type == "cuda" else None)


def is_replicated_wrapper(module: nn.Module) -> bool:
    return isinstance(module, DistributedDataParallel)


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module



