"""Worker for the ring-attention test: runs in each gloo process (see tests/helpers/dist.py)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from swarmlm.parallel.cp import ring_attention

RING_CASES = [
    dict(B=2, H=4, Hkv=4, T=16, Dh=8, causal=True, seed=0),
    dict(B=2, H=4, Hkv=2, T=16, Dh=8, causal=True, seed=1),   # grouped-query heads
    dict(B=1, H=2, Hkv=2, T=8, Dh=4, causal=False, seed=2),
]


def ring_vs_full(rank: int, cases: list[dict]) -> list[dict]:
    """For each case, max |ring - full| of the output and of dq, dk, dv (gathered over ranks)."""
    n = dist.get_world_size()
    results = []
    for case in cases:
        B, H, Hkv, T, Dh, causal = case["B"], case["H"], case["Hkv"], case["T"], case["Dh"], case["causal"]
        g = torch.Generator().manual_seed(case["seed"])
        q = torch.randn(B, H, T, Dh, generator=g, dtype=torch.float64)
        k = torch.randn(B, Hkv, T, Dh, generator=g, dtype=torch.float64)
        v = torch.randn(B, Hkv, T, Dh, generator=g, dtype=torch.float64)
        dout = torch.randn(B, H, T, Dh, generator=g, dtype=torch.float64)
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = F.scaled_dot_product_attention(*full, is_causal=causal, enable_gqa=Hkv != H)
        ref.backward(dout)
        local = [t.chunk(n, dim=2)[rank].clone().requires_grad_() for t in (q, k, v)]
        out = ring_attention(*local, dist.group.WORLD, causal=causal)
        out.backward(dout.chunk(n, dim=2)[rank])
        errs = {"out": (out - ref.chunk(n, dim=2)[rank]).abs().max().item()}
        for name, mine, theirs in zip(("dq", "dk", "dv"), local, full):
            errs[name] = (mine.grad - theirs.grad.chunk(n, dim=2)[rank]).abs().max().item()
        worst = torch.tensor([errs[k] for k in ("out", "dq", "dk", "dv")], dtype=torch.float64)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        results.append(dict(zip(("out", "dq", "dk", "dv"), worst.tolist())))
    return results
