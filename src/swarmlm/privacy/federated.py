"""Federated averaging: the decisions of a round and a client's local training, with no I/O.

    chosen = choose_clients(joined, cfg, round=r)              # Poisson (DP) or a seeded sample of K
    update, loss = local_train(model, batches, steps=E, lr=lr, mu=mu)   # FedAvg, FedProx with mu > 0
    update, loss = local_train_dp_sgd(model, examples, n, steps=E, ...)  # the same with sample-level DP-SGD
    vector = prepare_update(update, start, ...)                # clip, DP noise share: what is summed
    new = apply_sum(params, total, denominator(cfg, n))        # the next global model

Sums are over flat float vectors of all trainable parameters in `named_parameters` order
(tied weights once): the whole model, or with `lora_rank` only the LoRA B matrices (attach_lora). With DP the mean divides by the expected number of sampled clients
(q·N, McMahan et al. 2018) rather than by how many came, which would depend on who took
part; without DP by the number of survivors (plain FedAvg). The coordinator and the clients
call these; the networked parts live in coordinator.py and participant.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from swarmlm.errors import UserError
from swarmlm.model.lora import apply_lora
from swarmlm.privacy import dp


@dataclass(frozen=True)
class FlConfig:
    rounds: int = 20                 # federated rounds to complete
    clients_per_round: int = 5       # K: sampled per round (with DP: the Poisson rate is K / joined)
    min_clients: int = 2             # a round completes only over at least this many clients
    local_steps: int = 5             # E: local SGD steps per round
    fedprox_mu: float = 0.0          # FedProx proximal weight (0: FedAvg)
    lr: float = 0.3                  # local SGD learning rate (0.5 made the tiny model chaotic: 1e-8 apart became 1e-2)
    batch_size: int = 8              # sequences per local step
    seq_len: int = 64                # tokens per sequence
    secure: bool = False             # secure aggregation (privacy/secagg)
    coord_clip: float = 4.0          # each update coordinate is clipped to this (the fixed-point ring's range)
    dp_clip: float = 0.0             # C: L2 clip of each update (0: no DP)
    dp_noise: float = 0.0            # σ: noise multiplier of the sum
    dp_delta: float = 1e-5           # δ of the reported ε (client-level and sample-level)
    dp_sgd_clip: float = 0.0         # sample-level DP-SGD in local training: per-sample L2 clip (0: off)
    dp_sgd_noise: float = 0.0        # its noise multiplier: N(0, (σC)²) on each step's clipped gradient sum
    seed: int = 0                    # client sampling (and, with the clients' seeds, local batches)
    round_timeout_s: float = 120.0   # bound on each stage of a round
    max_attempts: int = 5            # failed attempts of one round before the run gives up
    lora_rank: int = 0               # 0: whole-model updates; else LoRA on q/v projections, only B trained
    lora_alpha: float = 16.0         # LoRA scale numerator

    def check(self) -> FlConfig:
        if self.rounds <= 0 or self.clients_per_round <= 0 or self.local_steps <= 0:
            raise UserError("--rounds, --clients-per-round and --local-steps must be positive")
        if not 1 <= self.min_clients:
            raise UserError("--min-clients must be at least 1")
        if self.secure and self.min_clients < 2:
            raise UserError("--secure-aggregation needs --min-clients of 2 at least (one client's sum is its update)")
        if self.min_clients > self.clients_per_round:
            raise UserError(f"--min-clients {self.min_clients} exceeds --clients-per-round {self.clients_per_round}")
        if self.lora_rank < 0:
            raise UserError("--lora-rank must not be negative")
        if self.fedprox_mu < 0 or not self.lr > 0 or not self.coord_clip > 0:
            raise UserError("--fedprox must be >= 0, and the learning rate and clip positive")
        if self.dp_noise > 0 and not self.dp_clip > 0:
            raise UserError("--dp-noise needs --dp-clip")
        if self.dp_clip:
            dp.DpConfig(self.dp_clip, self.dp_noise, self.dp_delta)        # ValueError -> UserError by the caller
        if self.dp_sgd_clip or self.dp_sgd_noise:
            check_dp_sgd(self.dp_sgd_clip, self.dp_sgd_noise, self.dp_delta)
        if self.batch_size <= 0 or self.seq_len <= 0:
            raise UserError("--batch-size and --seq-len must be positive")
        return self

    @property
    def dp(self) -> dp.DpConfig | None:
        return dp.DpConfig(self.dp_clip, self.dp_noise, self.dp_delta) if self.dp_clip > 0 else None


def check_dp_sgd(clip: float, noise: float, delta: float) -> None:
    """DP-SGD's settings as a round states them (the coordinator's flags, a client's RoundStart); else UserError."""
    if not (math.isfinite(clip) and clip > 0):
        raise UserError(f"--dp-sgd-clip must be positive, got {clip}")
    if not (math.isfinite(noise) and noise >= 0):
        raise UserError(f"--dp-sgd-noise must be zero or positive, got {noise}")
    if not 0 < delta < 1:
        raise UserError(f"--dp-delta must be in (0, 1), got {delta}")


def sampling_rate(cfg: FlConfig, n_joined: int) -> float:
    return min(1.0, cfg.clients_per_round / max(n_joined, 1))


def choose_clients(joined: Sequence[str], cfg: FlConfig, *, round: int, attempt: int = 0) -> list[str]:
    """The round's clients: with DP, Poisson sampling at rate K/N (the accounted event); without,
    K of them drawn without replacement. Deterministic in (seed, round, attempt) and the joined set."""
    ordered = sorted(joined)
    if cfg.dp is not None:
        return dp.poisson_sample(ordered, sampling_rate(cfg, len(ordered)), seed=cfg.seed, round=round * 1000 + attempt)
    k = min(cfg.clients_per_round, len(ordered))
    picks = np.random.default_rng([cfg.seed, round, attempt, 0xF1]).choice(len(ordered), size=k, replace=False)
    return [ordered[i] for i in sorted(picks)]


def denominator(cfg: FlConfig, n_summed: int, n_joined: int) -> float:
    """What the sum is divided by: q·N with DP (fixed, public), the survivors' count without."""
    if cfg.dp is not None:
        return max(sampling_rate(cfg, n_joined) * n_joined, 1.0)
    return float(n_summed)


def lora_seed(cfg: FlConfig, round: int, attempt: int) -> int:
    """The seed of a round's frozen LoRA A matrices: public, the same at the coordinator and every client."""
    return (cfg.seed * 1_000_003 + round * 1009 + attempt) % (1 << 62)


def attach_lora(model: nn.Module, rank: int, alpha: float, seed: int) -> None:
    """LoRA on the attention's q and v projections with A frozen (drawn from `seed`) and B trainable.

    With A fixed and shared, a client's weight change (alpha/r) B_i A is linear in B_i, so the mean
    of the clients' B is exactly the mean of their changes (FFA-LoRA, Sun et al. ICLR 2024); the
    coordinator folds it into the weights after each round and the next round starts afresh."""
    apply_lora(model, rank=rank, alpha=alpha, generator=torch.Generator().manual_seed(seed))
    for name, p in model.named_parameters():
        if name.endswith("lora_a"):
            p.requires_grad_(False)


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def flatten(model: nn.Module) -> np.ndarray:
    """The trainable parameters as one float64 vector (d,)."""
    return np.concatenate([p.detach().reshape(-1).double().numpy() for _, p in trainable(model)])


def load_flat(model: nn.Module, vector: np.ndarray) -> None:
    """Set the trainable parameters from a flat vector (d,)."""
    offset = 0
    with torch.no_grad():
        for _, p in trainable(model):
            n = p.numel()
            p.copy_(torch.from_numpy(np.asarray(vector[offset:offset + n])).view_as(p).to(p.dtype))
            offset += n
    if offset != vector.size:
        raise ValueError(f"a vector of {vector.size} coordinates for a model of {offset}")


def local_train(model: nn.Module, next_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]], *, steps: int,
                lr: float, mu: float, loss_fn: Callable) -> tuple[np.ndarray, float]:
    """E steps of SGD from the global model (FedProx adds mu/2 ||w - w_global||^2): (update, mean loss)."""
    start = [p.detach().clone() for _, p in trainable(model)]
    params = [p for _, p in trainable(model)]
    opt = torch.optim.SGD(params, lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        x, y = next_batch(step)
        loss = loss_fn(model, x, y)
        losses.append(float(loss.detach()))
        if mu > 0:
            loss = loss + 0.5 * mu * sum(((p - s) ** 2).sum() for p, s in zip(params, start))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    update = np.concatenate([(p.detach() - s).reshape(-1).double().numpy() for p, s in zip(params, start)])
    return update, float(np.mean(losses))


def local_train_dp_sgd(model: nn.Module, examples: Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]],
                       n_examples: int, *, steps: int, lr: float, mu: float, batch_size: int, clip: float,
                       noise_multiplier: float, per_sample_loss: Callable, rng: np.random.Generator,
                       generator: torch.Generator) -> tuple[np.ndarray, float]:
    """`local_train` with sample-level DP-SGD (dpsgd.py): each step Poisson-samples the `n_examples`
    local examples at rate q = batch_size / n_examples (the accounted event), clips each one's
    gradient to `clip`, adds N(0, (σ·clip)²) to the sum and divides by the expected batch size.
    FedProx's term depends on no example, so it is added after the noise. (update, mean loss)."""
    from swarmlm.privacy import dpsgd
    rate = batch_size / n_examples
    params = dict(trainable(model))
    start = {n: p.detach().clone() for n, p in params.items()}
    model.train()
    losses = []
    for _ in range(steps):
        x, y = examples(dpsgd.poisson_indices(n_examples, rate, rng))
        grads = dpsgd.noisy_gradient(model, per_sample_loss, x, y, clip=clip, noise_multiplier=noise_multiplier,
                                     expected_batch=float(batch_size), generator=generator)
        with torch.no_grad():
            if len(x):
                losses.append(float(per_sample_loss(model(x), y)))
            for name, p in params.items():
                g = grads[name] + mu * (p - start[name]) if mu > 0 else grads[name]
                p -= lr * g.to(p.dtype)
    update = np.concatenate([(p.detach() - start[n]).reshape(-1).double().numpy() for n, p in params.items()])
    return update, float(np.mean(losses)) if losses else float("nan")


def prepare_update(update: np.ndarray, cfg_clip: float, *, dp_clip: float, dp_noise: float, min_clients: int,
                   rng: np.random.Generator) -> np.ndarray:
    """What a client contributes to the sum: its update, L2-clipped with DP and plus its noise share,
    then clipped per coordinate to the fixed-point range (so plain and secure rounds sum the same)."""
    if dp_clip > 0:
        update, _ = dp.clip_update(update, dp_clip)
        if dp_noise > 0:
            update = update + dp.noise_share(update.size, clip=dp_clip, noise_multiplier=dp_noise,
                                             min_clients=min_clients, rng=rng)
    out = np.minimum(update, cfg_clip)                  # np.clip costs twice as much on 1M coordinates
    return np.maximum(out, -cfg_clip, out=out)


def apply_sum(params: np.ndarray, total: np.ndarray, denom: float) -> np.ndarray:
    if total.shape != params.shape or not np.isfinite(total).all():
        raise ValueError("an aggregate of the wrong size, or not finite")
    return params + total / denom
