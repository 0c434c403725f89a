"""`serve --max-memory SIZE`: how many blocks, and how much cache, fit in a memory bound.

Pure: the caller measures what the process already holds (`overhead_bytes`: its resident set
once the peer runs, plus a reserve) and passes the model's per-block sizes; `plan_memory`
returns the span length and the server limits to use, or a one-line `UserError` when not even
one block fits. What it counts, per served block:

    weights      block_bytes (quantized if asked: model/quant.py's block_weight_bytes)
    KV cache     cache tokens x kv_bytes_per_token, the cache tokens shared by all sessions

and once: `overhead_bytes`, the float copy of one block while it is loaded and quantized
(`load_bytes`: blocks are loaded one at a time), and the working memory of the largest
request (`scratch_bytes_per_token` x max_request_tokens, plus attention scores for a request
that is one sequence). Forwards kept for a backward are not kept under a bound (the backward
recomputes them). Knows nothing of peers or tensors.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from swarmlm.errors import UserError
from swarmlm.swarm.server.budget import BudgetLimits

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 10 ** 3, "kib": 1 << 10, "m": 1 << 20, "mb": 10 ** 6, "mib": 1 << 20,
          "g": 1 << 30, "gb": 10 ** 9, "gib": 1 << 30}
MIN_CACHE_TOKENS = 1024         # a server that cannot hold this many cached positions is not worth running
MAX_REQUEST_TOKENS = 1024       # requests are cut to this under a bound (clients split longer prompts' forwards)


def parse_size(text: str) -> int:
    """"512MB" / "512M" / "0.5GiB" / "1000000" -> bytes (MB = 10^6, MiB and M = 2^20)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text or "")
    if m is None or m.group(2).lower() not in _UNITS:
        raise UserError(f"--max-memory must look like 512MB, 1.5GiB or 800M, got {text!r}")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise UserError(f"--max-memory must be positive, got {text!r}")
    return value


def format_size(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


@dataclass(frozen=True)
class MemoryPlan:
    n_blocks: int               # blocks to serve
    limits: BudgetLimits        # the server's limits, cache and request sizes capped to fit
    weights_bytes: int          # n_blocks x block_bytes
    cache_bytes: int            # limits.max_cache_tokens x kv_bytes_per_token x n_blocks
    fixed_bytes: int            # overhead + loading + working memory


def plan_memory(max_bytes: int, *, overhead_bytes: int, block_bytes: int, load_bytes: int, kv_bytes_per_token: int,
                scratch_bytes_per_token: int, attn_bytes_per_token_pair: int, n_layers: int,
                want_blocks: int | None, limits: BudgetLimits) -> MemoryPlan:
    """The most blocks (at most `want_blocks`, default all) that fit with at least MIN_CACHE_TOKENS
    cached positions each, and as much cache as then fits (at most `limits.max_cache_tokens`)."""
    request = min(limits.max_request_tokens, MAX_REQUEST_TOKENS)
    scratch = request * scratch_bytes_per_token + request * request * attn_bytes_per_token_pair
    fixed = overhead_bytes + load_bytes + scratch
    free = max_bytes - fixed
    most = min(want_blocks or n_layers, n_layers)
    min_cache = min(MIN_CACHE_TOKENS, limits.max_cache_tokens)
    for n in range(most, 0, -1):
        tokens = min(limits.max_cache_tokens, (free - n * block_bytes) // max(1, n * kv_bytes_per_token))
        if tokens >= min_cache:
            capped = dataclasses.replace(limits, max_cache_tokens=tokens,
                                         max_session_tokens=min(limits.max_session_tokens, tokens),
                                         max_request_tokens=request, max_kept_bytes=0)
            return MemoryPlan(n, capped, n * block_bytes, tokens * n * kv_bytes_per_token, fixed)
    need = fixed + block_bytes + min_cache * kv_bytes_per_token
    raise UserError(f"--max-memory {format_size(max_bytes)} is too small for one block: it needs about "
                    f"{format_size(need)} ({format_size(overhead_bytes)} for the process and its peer, "
                    f"{format_size(block_bytes)} of weights, {format_size(min_cache * kv_bytes_per_token)} for "
                    f"{min_cache} cached tokens, {format_size(load_bytes + scratch)} to load and compute); "
                    f"try --quantize int4 or a larger bound")
