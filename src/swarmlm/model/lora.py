"""LoRA (Hu et al. 2021): a frozen nn.Linear plus a trainable low-rank update, y = W x + (alpha/r) B A x.

`LoRALinear` wraps one layer (swarm fine-tuning puts it on the client's lm head); `apply_lora`
wraps the named projections of every block of a model from outside, the way a parallel plan
is applied, so federated rounds can train and exchange only the adapters of a larger model.
B starts at zero, so a freshly wrapped model computes exactly what it did before. Knows
nothing of swarms or rounds.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

DEFAULT_TARGETS = ("q_proj", "v_proj")


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"a LoRA rank is positive, got {rank}")
        self.base = base
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features, generator=generator) / math.sqrt(base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale  # (..., out)


def apply_lora(model: nn.Module, *, rank: int, alpha: float = 16.0, targets: Iterable[str] = DEFAULT_TARGETS,
               generator: torch.Generator | None = None) -> dict[str, nn.Parameter]:
    """Freeze `model` and wrap every nn.Linear whose attribute name is in `targets` with a LoRA.

    Returns the trainable parameters by name (`<module path>.lora_a` / `.lora_b`), in module order.
    """
    targets = set(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    found = [(name, module) for name, module in model.named_modules()
             for attr in targets if isinstance(getattr(module, attr, None), nn.Linear)]
    trainable: dict[str, nn.Parameter] = {}
    for name, module in found:
        for attr in sorted(targets):
            layer = getattr(module, attr, None)
            if isinstance(layer, nn.Linear):
                wrapped = LoRALinear(layer, rank, alpha, generator)
                setattr(module, attr, wrapped)
                prefix = f"{name}.{attr}" if name else attr
                trainable[f"{prefix}.lora_a"] = wrapped.lora_a
                trainable[f"{prefix}.lora_b"] = wrapped.lora_b
    if not trainable:
        raise ValueError(f"no nn.Linear named {sorted(targets)} in the model")
    return trainable


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA into its base weight (W += (alpha/r) B A) and put the base layer back; returns how many."""
    merged = 0
    for module in list(model.modules()):
        for attr, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                with torch.no_grad():
                    child.base.weight += child.scale * (child.lora_b @ child.lora_a)   # (out, r) @ (r, in)
                setattr(module, attr, child.base)
                merged += 1
    return merged
