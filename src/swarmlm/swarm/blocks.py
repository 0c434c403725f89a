"""Running a span of blocks, with deep prompts: the one computation servers and clients share.

A server runs `run_span` on its blocks; the client runs it on the blocks it keeps itself and
in the local reference a swarm result is compared against, so both sides compute exactly the
same thing. Deep prompts (n_span_blocks, B or 1, P, D) are added to the first P positions of
the hidden states before each block (P-tuning v2); without them the span runs in one
`Transformer.run_blocks` call, or, for a decode step (one new token per row with a cache, no
mask), in model/fastdecode.py's lean step, which computes exactly what run_blocks computes.
`measure_throughput` times a span's one-token step, what a server announces. Knows nothing of
peers or the wire.
"""

from __future__ import annotations

import time

import torch

from swarmlm.model.cache import KVCache
from swarmlm.model.fastdecode import span_step
from swarmlm.model.transformer import Transformer


def run_span(model: Transformer, h: torch.Tensor, start: int, end: int, *, cache: KVCache | None = None,
             key_mask: torch.Tensor | None = None, prompts: torch.Tensor | None = None,
             into: torch.Tensor | None = None) -> torch.Tensor:
    """Blocks [start, end) of `model` on h (B, T, D) -> (B, T, D).

    key_mask (B, T) marks the new positions' real tokens; with a cache they continue its
    sequence. prompts (end-start, B or 1, P, D) with P <= T, or None. `into`: a contiguous
    (B, 1, D) buffer of h's dtype that a one-token step through the lean path writes its outputs
    into and returns once they are checked finite, or None (NaN or infinity: the cache is not
    advanced) (server/fast.py's); any other step returns a new tensor, unchecked.
    """
    if prompts is None:
        if cache is not None and h.shape[1] == 1 and key_mask is None and not torch.is_grad_enabled():
            step = span_step(model, cache, start, end)        # one token per row: the lean step, same numbers
            if step is not None:
                cache.check_room(1)
                return step.run(h, into=into)
        return model.run_blocks(h, start=start, end=end, cache=cache, key_mask=key_mask)
    B, T, D = h.shape
    P = prompts.shape[2]
    assert prompts.shape[0] == end - start and P <= T, "deep prompts do not fit the span or the input"
    for j, i in enumerate(range(start, end)):
        h = torch.cat([h[:, :P] + prompts[j].expand(B, P, D), h[:, P:]], dim=1)  # (B, T, D)
        h = model.run_blocks(h, start=i, end=i + 1, cache=cache, key_mask=key_mask, advance=False)
    if cache is not None:
        cache.advance(T, None if key_mask is None else key_mask[:, -T:])
    return h


def measure_throughput(model: Transformer, *, n_tokens: int = 1, repeats: int = 5) -> float:
    """Decode throughput of one block, tokens/s: the median time of a one-token step through the span."""
    span = model.layer_range
    dtype = next(model.parameters()).dtype
    cache = KVCache.empty(model.cfg, 1, repeats + 2, layers=span, dtype=dtype)
    h = torch.randn(1, n_tokens, model.cfg.dim, dtype=dtype)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            run_span(model, h, span.start, span.stop, cache=cache)
            if i:                                # the first call warms up kernels and allocations
                times.append(time.perf_counter() - t0)
    times.sort()
    per_block_s = times[len(times) // 2] / len(span)
    return n_tokens / max(per_block_s, 1e-9)
