"""Sample-level DP-SGD (Abadi et al. 2016) for local training: per-sample gradients with
`torch.func` (vmap over grad of one sample's loss), each clipped to L2 norm `clip`, summed,
plus Gaussian noise of std `noise_multiplier * clip`, divided by the (expected) batch size.

    idx = poisson_indices(n_examples, rate, rng)           # each example kept with probability `rate`
    loss = dp_sgd_step(model, per_sample_loss, x[idx], y[idx], clip=1.0, noise_multiplier=1.1, lr=0.1,
                       expected_batch=rate * n_examples, generator=g)

`per_sample_loss(output, target)` gets one sample's model output and target with a leading batch
dimension of 1. The ε of a run of such steps is the accountant's for
`PoissonSampledDpEvent(rate, GaussianDpEvent(noise_multiplier))` composed once per step, when
the batches are drawn by `poisson_indices` and divided by the expected batch size (a batch may
be empty: the step is then noise alone). The federated client (`swarmlm fl`, --dp-sgd-clip)
trains this way. Knows nothing of rounds or peers.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
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


def poisson_indices(n_examples: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """The indices of a Poisson-sampled batch: each of `n_examples` kept independently with probability `rate`."""
    if not 0 < rate <= 1:
        raise ValueError(f"a sampling rate is in (0, 1], got {rate}")
    return np.flatnonzero(rng.random(n_examples) < rate)


def clip_and_noise(grads: dict[str, torch.Tensor], *, clip: float, noise_multiplier: float,
                   generator: torch.Generator | None, denominator: float | None = None
                   ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(the noisy summed gradient per parameter divided by `denominator` (default: the batch size),
    each sample's norm before clipping (B,))."""
    batch = next(iter(grads.values())).shape[0]
    if batch == 0 and denominator is None:
        raise ValueError("an empty batch's noise is divided by the expected batch size: pass `denominator`")
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))             # (B,), B may be 0
    factor = (clip / (norms + 1e-12)).clamp(max=1.0)                                         # (B,)
    out = {}
    for name, g in grads.items():
        total = torch.einsum("b,b...->...", factor, g)                                       # (*shape)
        if noise_multiplier > 0:
            total = total + torch.randn(total.shape, generator=generator) * (noise_multiplier * clip)
        out[name] = total / (batch if denominator is None else denominator)
    return out, norms


def noisy_gradient(model: nn.Module, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor, *, clip: float,
                   noise_multiplier: float, expected_batch: float,
                   generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """name -> the clipped, noised gradient sum over the batch divided by `expected_batch`; an empty
    batch (Poisson sampling may draw none) gives the noise alone."""
    if len(x):
        grads = per_sample_grads(model, loss_fn, x, y)
    else:
        grads = {n: torch.zeros((0, *p.shape)) for n, p in model.named_parameters() if p.requires_grad}
    noisy, _ = clip_and_noise(grads, clip=clip, noise_multiplier=noise_multiplier, generator=generator,
                              denominator=expected_batch)
    return noisy


def dp_sgd_step(model: nn.Module, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor, *, clip: float,
                noise_multiplier: float, lr: float, expected_batch: float | None = None,
                generator: torch.Generator | None = None) -> float:
    """One DP-SGD step in place; returns the batch's mean loss before the step (NaN for an empty batch)."""
    if not clip > 0 or noise_multiplier < 0:
        raise ValueError("DP-SGD needs clip > 0 and noise_multiplier >= 0")
    if expected_batch is None:
        expected_batch = max(len(x), 1)
    noisy = noisy_gradient(model, loss_fn, x, y, clip=clip, noise_multiplier=noise_multiplier,
                           expected_batch=expected_batch, generator=generator)
    with torch.no_grad():
        loss = float(loss_fn(model(x), y)) if len(x) else float("nan")
        for name, p in model.named_parameters():
            if name in noisy:
                p -= lr * noisy[name]
    return loss
