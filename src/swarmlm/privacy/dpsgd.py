"""Sample-level DP-SGD (Abadi et al. 2016) for local training: per-sample gradients with
`torch.func` (vmap over grad of one sample's loss), each clipped to L2 norm `clip`, summed,
plus Gaussian noise of std `noise_multiplier * clip`, divided by the batch size.

    loss = dp_sgd_step(model, per_sample_loss, x, y, clip=1.0, noise_multiplier=1.1, lr=0.1, generator=g)

`per_sample_loss(output, target)` gets one sample's model output and target with a leading batch
dimension of 1. The ε of a run of such steps is the accountant's for Poisson sampling of the
batches; the federated client does not use this yet (its batches are drawn with replacement).
Knows nothing of rounds or peers.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap


def per_sample_grads(model: nn.Module, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """name -> (B, *param.shape): the gradient of each sample's loss alone."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def one(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    return vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)


def clip_and_noise(grads: dict[str, torch.Tensor], *, clip: float, noise_multiplier: float,
                   generator: torch.Generator | None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(the noisy mean gradient per parameter, each sample's norm before clipping (B,))."""
    batch = next(iter(grads.values())).shape[0]
    norms = torch.sqrt(sum(g.reshape(batch, -1).pow(2).sum(1) for g in grads.values()))     # (B,)
    factor = (clip / (norms + 1e-12)).clamp(max=1.0)                                         # (B,)
    out = {}
    for name, g in grads.items():
        total = torch.einsum("b,b...->...", factor, g)                                       # (*shape)
        if noise_multiplier > 0:
            total = total + torch.randn(total.shape, generator=generator) * (noise_multiplier * clip)
        out[name] = total / batch
    return out, norms


def dp_sgd_step(model: nn.Module, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor, *, clip: float,
                noise_multiplier: float, lr: float, generator: torch.Generator | None = None) -> float:
    """One DP-SGD step in place; returns the batch's mean loss before the step."""
    if not clip > 0 or noise_multiplier < 0:
        raise ValueError("DP-SGD needs clip > 0 and noise_multiplier >= 0")
    grads = per_sample_grads(model, loss_fn, x, y)
    noisy, _ = clip_and_noise(grads, clip=clip, noise_multiplier=noise_multiplier, generator=generator)
    with torch.no_grad():
        loss = float(loss_fn(model(x), y))
        for name, p in model.named_parameters():
            if name in noisy:
                p -= lr * noisy[name]
    return loss
