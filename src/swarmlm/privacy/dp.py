"""Client-level differential privacy for federated rounds (McMahan et al., ICLR 2018: DP-FedAvg),
with the noise added in a distributed way so that it works under secure aggregation.

- Each client clips its update to L2 norm `clip` (C): one client changes the sum by at most C.
- Each client adds Gaussian noise N(0, σ²C²/m) to every coordinate, with m the least number of
  clients whose updates a completed round sums (`--min-clients`). Any round that completes
  sums at least m noise shares, so the sum carries noise of standard deviation at least σ·C
  (the coordinator never sees a client's update without the others' noise when aggregation
  is secure).
- Clients are sampled by Poisson sampling with rate q: each joined client independently with
  probability q, from a generator seeded by (seed, round): the very event that is accounted.
- ε at δ is what Google's `dp-accounting` gives for
  `SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(σ)), rounds)`: its RDP
  accountant by default, its PLD one on request. No formula of ours.

Knows nothing of peers or models: vectors in, vectors out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class DpConfig:
    clip: float                    # C: each client's update is clipped to this L2 norm
    noise_multiplier: float        # σ: the sum of a round carries Gaussian noise of std σ·C
    delta: float = 1e-5            # δ of the reported (ε, δ)
    accountant: str = "rdp"        # "rdp" or "pld" (dp-accounting's two accountants)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"--dp-clip must be positive, got {self.clip}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(f"--dp-noise must be zero or positive, got {self.noise_multiplier}")
        if not 0 < self.delta < 1:
            raise ValueError(f"--dp-delta must be in (0, 1), got {self.delta}")
        if self.accountant not in ("rdp", "pld"):
            raise ValueError(f"accountant must be rdp or pld, got {self.accountant!r}")


def clip_update(x: np.ndarray, clip: float) -> tuple[np.ndarray, float]:
    """`x` scaled down to L2 norm at most `clip`, and its norm before clipping."""
    norm = float(np.linalg.norm(x))
    if not math.isfinite(norm):
        raise ValueError("an update holds NaN or infinity")
    return (x * (clip / norm) if norm > clip else x), norm


def noise_share(length: int, *, clip: float, noise_multiplier: float, min_clients: int,
                rng: np.random.Generator) -> np.ndarray:
    """One client's share of the round's noise: N(0, (σC)²/m) per coordinate; m shares make σC."""
    if min_clients < 1:
        raise ValueError("min_clients must be at least 1")
    std = noise_multiplier * clip / math.sqrt(min_clients)
    return rng.normal(0.0, std, size=length)


def poisson_sample(clients: Sequence[str], rate: float, *, seed: int, round: int) -> list[str]:
    """Each client (in sorted order) kept independently with probability `rate`; deterministic in (seed, round)."""
    if not 0 < rate <= 1:
        raise ValueError(f"a sampling rate is in (0, 1], got {rate}")
    ordered = sorted(clients)
    draws = np.random.default_rng([seed, round, 0x5A]).random(len(ordered))
    return [c for c, u in zip(ordered, draws) if u < rate]


def dp_event(sampling_rate: float, noise_multiplier: float, rounds: int):
    """The accounted event: `rounds` compositions of a Poisson-sampled Gaussian mechanism."""
    from dp_accounting import dp_event as ev
    return ev.SelfComposedDpEvent(ev.PoissonSampledDpEvent(sampling_rate, ev.GaussianDpEvent(noise_multiplier)),
                                  rounds)


def epsilon(sampling_rate: float, noise_multiplier: float, rounds: int, delta: float, *,
            accountant: str = "rdp") -> float:
    """ε at `delta` after `rounds` rounds, from dp-accounting (inf when there is no noise)."""
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    if accountant == "pld":
        from dp_accounting.pld import pld_privacy_accountant
        acc = pld_privacy_accountant.PLDAccountant()
    else:
        from dp_accounting.rdp import rdp_privacy_accountant
        acc = rdp_privacy_accountant.RdpAccountant()
    acc.compose(dp_event(sampling_rate, noise_multiplier, rounds))
    return float(acc.get_epsilon(delta))


def event_record(config: DpConfig, sampling_rate: float, rounds: int) -> dict:
    """The fields `rounds.jsonl` carries for the event so far, with its ε."""
    return {"sampling": "poisson", "sampling_rate": sampling_rate, "noise_multiplier": config.noise_multiplier,
            "rounds": rounds, "delta": config.delta, "accountant": config.accountant,
            "epsilon": epsilon(sampling_rate, config.noise_multiplier, rounds, config.delta,
                               accountant=config.accountant)}
