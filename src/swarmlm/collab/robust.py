"""Robust aggregation: how one part's contributions from several peers become one tensor.

    kept, dropped = validate_updates(updates, shape=(n,), dtype=torch.float32)
    avg = aggregate("centered-clip", [t for _, t, _ in kept], weights=[w for _, _, w in kept])

`mean` is the weighted average: one peer sending its update times −100 moves it anywhere.
`trimmed-mean` drops, coordinate by coordinate, the largest and smallest values (with three
peers: the median). `centered-clip` (Karimireddy et al., 2021, "Learning from history for
Byzantine robust optimization") starts from the coordinate-wise median and moves towards
each contribution by at most `tau`, so one peer shifts the result by at most tau / n.
Robust aggregators ignore the weights: a liar could claim any sample count.

All functions are pure and know nothing of peers or the network; `validate_updates` returns
why each dropped update was dropped, and the caller logs it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

AGGREGATORS = ("mean", "trimmed-mean", "centered-clip")
TRIM_FRACTION = 0.25      # trimmed-mean drops this share from each side (at least one when n ≥ 3)
CLIP_ITERS = 5            # centered-clip fixed-point iterations


def validate_update(t: object, *, shape: Sequence[int], dtype: torch.dtype) -> str | None:
    """Why `t` cannot be aggregated with updates of `shape`/`dtype`, or None if it can."""
    if not isinstance(t, torch.Tensor):
        return f"not a tensor ({type(t).__name__})"
    if t.dtype != dtype:
        return f"dtype {t.dtype}, expected {dtype}"
    if tuple(t.shape) != tuple(shape):
        return f"shape {tuple(t.shape)}, expected {tuple(shape)}"
    if not all_finite(t):
        return "contains NaN or inf"
    return None


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or inf in `t`. A float32 sum is one fast pass (NaN and inf propagate); only when it
    is not finite, which huge finite values can also cause, the exact elementwise check runs."""
    return t.numel() == 0 or math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())


def validate_updates(updates: Sequence[tuple[str, object, float]], *, shape: Sequence[int], dtype: torch.dtype
                     ) -> tuple[list[tuple[str, torch.Tensor, float]], list[tuple[str, str]]]:
    """Split (sender, tensor, weight) updates into the usable ones and (sender, reason) for the rest."""
    kept, dropped = [], []
    for sender, t, weight in updates:
        reason = validate_update(t, shape=shape, dtype=dtype)
        if reason is None and not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
            reason = f"weight {weight!r} is not a positive number"
        if reason is None:
            kept.append((sender, t, float(weight)))
        else:
            dropped.append((sender, reason))
    return kept, dropped


def aggregate(name: str, tensors: Sequence[torch.Tensor], weights: Sequence[float] | None = None) -> torch.Tensor:
    """Combine same-shape float tensors with the aggregator `name` (one of AGGREGATORS)."""
    if not tensors:
        raise ValueError("nothing to aggregate")
    if name == "mean":
        return weighted_mean(tensors, weights)
    if name == "trimmed-mean":
        return trimmed_mean(tensors)
    if name == "centered-clip":
        return centered_clip(tensors)
    raise ValueError(f"unknown aggregator {name!r}; expected one of {AGGREGATORS}")


def weighted_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float] | None = None) -> torch.Tensor:
    if weights is None:
        weights = [1.0] * len(tensors)
    total = float(sum(weights))
    out = torch.zeros_like(tensors[0], dtype=torch.float32)
    for t, w in zip(tensors, weights):
        out.add_(t.float(), alpha=w / total)
    return out


def n_trimmed(n: int) -> int:
    """How many values trimmed-mean drops from each side for n contributions."""
    if n < 3:
        return 0
    return min((n - 1) // 2, max(1, int(n * TRIM_FRACTION)))


def trimmed_mean(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    n = len(tensors)
    k = n_trimmed(n)
    if k == 0:
        return weighted_mean(tensors)
    stacked = torch.stack([t.float() for t in tensors])            # (n, *shape)
    ordered = stacked.sort(dim=0).values
    return ordered[k:n - k].mean(dim=0)


def centered_clip(tensors: Sequence[torch.Tensor], *, tau: float | None = None, iters: int = CLIP_ITERS
                  ) -> torch.Tensor:
    """Centered clipping from the coordinate-wise median. Without a fixed `tau`, each iteration
    takes the median distance to the current center: honest updates sit within it, so the
    result is their mean plus at most tau·f/n from f outliers, and tau shrinks as the center
    settles among the honest updates."""
    n = len(tensors)
    if n < 3:
        return weighted_mean(tensors)
    stacked = torch.stack([t.float().reshape(-1) for t in tensors])  # (n, numel)
    center = stacked.median(dim=0).values                            # (numel,)
    for _ in range(iters):
        diff = stacked - center                                      # (n, numel)
        norms = diff.norm(dim=1, keepdim=True)                       # (n, 1)
        radius = tau if tau is not None else float(norms.median())
        if radius <= 0:
            break
        scale = torch.clamp(radius / norms.clamp_min(1e-30), max=1.0)
        center = center + (diff * scale).mean(dim=0)
    return center.reshape(tensors[0].shape)
