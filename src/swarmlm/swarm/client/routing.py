"""Choosing a chain of servers that covers a span of blocks with the least expected latency.

Pure: the caller passes in what servers announced (`ServerInfo`), the round-trip times it
measured, its own load on each server and a seeded `random.Random` for tie-breaking, and gets
back a list of `Hop`s. No network, no clock.

The expected latency of running blocks [a, b) on server s for T tokens is

    rtt(s) + T * (b - a) / throughput(s) * (1 + sessions(s) + own_load(s)) * (1 + jitter * U)

(a server runs one request at a time, so each session open on it is another request to wait
behind; U ~ Uniform[0, 1) spreads clients over equal replicas). The cheapest chain is a
shortest path over block boundaries, found by dynamic programming since hops only go forward.
Knows nothing of tensors or peers beyond their IDs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from swarmlm.errors import NotFoundError


@dataclass(frozen=True)
class ServerInfo:
    peer_id: str                 # base58 peer ID
    start: int                   # span [start, end) the server holds
    end: int
    block_tokens_per_s: float    # announced decode throughput of one block
    free_cache_tokens: int = 1 << 30   # cache positions still free (inference sessions)
    sessions: int = 0            # inference sessions open on it, as announced
    dtype: str = "float32"       # its compute dtype
    quantization: str = "none"   # its weights' quantization (model/quant.py's scheme name)


@dataclass(frozen=True)
class Hop:
    peer_id: str
    start: int                   # blocks [start, end) this hop runs; inside the server's span
    end: int


def format_blocks(blocks: Sequence[int]) -> str:
    """[2, 3, 4, 7] -> "2..4, 7"."""
    parts: list[str] = []
    run_start = prev = None
    for b in list(blocks) + [None]:
        if prev is not None and b == prev + 1:
            prev = b
            continue
        if run_start is not None:
            parts.append(str(run_start) if run_start == prev else f"{run_start}..{prev}")
        run_start = prev = b
    return ", ".join(parts)


def uncovered_blocks(servers: Iterable[ServerInfo], start: int, end: int, *,
                     banned: Iterable[str] = ()) -> list[int]:
    """Blocks in [start, end) that no server outside `banned` holds."""
    banned = set(banned)
    covered = set()
    for s in servers:
        if s.peer_id not in banned:
            covered.update(range(max(s.start, start), min(s.end, end)))
    return [i for i in range(start, end) if i not in covered]


def hop_cost(s: ServerInfo, n_blocks: int, *, n_tokens: int, rtt_s: float, own_load: int, noise: float) -> float:
    """Expected seconds to run `n_blocks` of server `s` for `n_tokens` tokens."""
    compute_s = n_tokens * n_blocks / max(s.block_tokens_per_s, 1e-9)
    return rtt_s + compute_s * (1 + s.sessions + own_load) * (1 + noise)


def choose_chain(servers: Sequence[ServerInfo], start: int, end: int, *, rtt_s: Mapping[str, float],
                 rng: random.Random, n_tokens: int = 1, default_rtt_s: float = 0.01,
                 own_load: Mapping[str, int] | None = None, banned: Iterable[str] = (),
                 need_cache_tokens: int = 0, jitter: float = 0.1) -> list[Hop]:
    """The chain of hops covering [start, end) with the least expected latency.

    Servers in `banned`, or with fewer than `need_cache_tokens` free cache positions, are not
    used. Raises `NotFoundError` naming the blocks no usable server holds.
    """
    if not 0 <= start < end:
        raise ValueError(f"bad span {start}:{end}")
    banned = set(banned)
    own_load = own_load or {}
    usable = [s for s in servers if s.peer_id not in banned and s.free_cache_tokens >= need_cache_tokens
              and s.start < end and s.end > start]
    usable.sort(key=lambda s: s.peer_id)            # the rng draws in a fixed order
    noise = {s.peer_id: rng.random() * jitter for s in usable}
    INF = float("inf")
    best = {start: 0.0}                             # boundary -> least cost to reach it
    came_from: dict[int, Hop] = {}
    for a in range(start, end):
        if best.get(a, INF) == INF:
            continue
        for s in usable:
            if not s.start <= a < s.end:
                continue
            for b in range(a + 1, min(s.end, end) + 1):
                cost = best[a] + hop_cost(s, b - a, n_tokens=n_tokens, rtt_s=rtt_s.get(s.peer_id, default_rtt_s),
                                          own_load=own_load.get(s.peer_id, 0), noise=noise[s.peer_id])
                if cost < best.get(b, INF):
                    best[b] = cost
                    came_from[b] = Hop(s.peer_id, a, b)
    if end not in best:
        missing = uncovered_blocks(servers, start, end, banned=banned)
        if not missing:   # every block is held, but not by servers with free cache
            raise NotFoundError(f"no server with {need_cache_tokens} free cache tokens holds blocks "
                                f"{format_blocks(range(start, end))}")
        raise NotFoundError(f"no server holds blocks {format_blocks(missing)}")
    chain: list[Hop] = []
    b = end
    while b != start:
        hop = came_from[b]
        chain.append(hop)
        b = hop.start
    return chain[::-1]
