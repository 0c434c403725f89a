"""Prompts whose greedy decoding is decisive enough to compare private generation with local.

MPC's fixed point (16 fractional bits, truncations off by a unit or two at random) moves each
logit by up to ~5e-4 of the largest. A random tiny model often has two top logits closer than
that somewhere in 16 steps, and there the private token may flip from run to run, although
both are right within the protocol's precision. The tests therefore take, among candidate
prompts, the first whose local greedy decode keeps its top two logits apart by `margin` of
the largest logit at every step: deterministic for a given model, and still a 16-token,
token-for-token comparison.
"""

from __future__ import annotations

from typing import Sequence

import torch

MARGIN = 3e-3              # six times the largest error the MPC tests measure


def greedy_margin(model, prompt: Sequence[int], n: int) -> float:
    """The smallest (top1 - top2) / max |logit| over a greedy decode of `n` tokens after `prompt`."""
    ids, worst = list(prompt), float("inf")
    with torch.inference_mode():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0, -1].float()
            top = torch.topk(logits, 2).values
            worst = min(worst, float((top[0] - top[1]) / logits.abs().max()))
            ids.append(int(logits.argmax()))
    return worst


def decisive(model, candidates: Sequence[Sequence[int]], n: int, margin: float = MARGIN) -> list[int]:
    """The first candidate prompt whose greedy decode of `n` tokens keeps `margin` (see above)."""
    for prompt in candidates:
        if greedy_margin(model, prompt, n) >= margin:
            return list(prompt)
    raise AssertionError(f"no candidate prompt decodes {n} tokens with a margin of {margin}")
