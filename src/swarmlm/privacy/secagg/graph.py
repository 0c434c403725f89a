"""Who shares masks with whom: the complete graph of SecAgg, or the sparse graph of SecAgg+.

Bell et al. (CCS 2020) replace the complete graph by a random k-regular one: the clients,
shuffled by a seed the coordinator publishes in the round's roster, sit on a ring and each is
a neighbour of the k/2 clients on either side (a Harary graph under a random permutation).
Masks and Shamir shares only travel along edges, so a client's work grows with k = O(log n)
instead of n. Everyone computes the same graph from the roster; a pure function.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def default_degree(n: int) -> int:
    """Neighbours per client: all of them up to 16 clients, then 2*ceil(log2 n) (an even number)."""
    if n <= 16:
        return n - 1
    return min(n - 1, 2 * math.ceil(math.log2(n)))


def default_threshold(degree: int) -> int:
    """Shares needed to rebuild a secret: a strict majority of its holders (the client's neighbours and itself)."""
    return (degree + 1) // 2 + 1


def neighbours(clients: Sequence[str], degree: int, seed: int) -> dict[str, list[str]]:
    """Each client's neighbours, sorted; symmetric. `degree >= n - 1` gives the complete graph."""
    ids = sorted(clients)
    n = len(ids)
    if degree >= n - 1:
        return {c: [o for o in ids if o != c] for c in ids}
    if degree < 2 or degree % 2:
        raise ValueError(f"a sparse graph needs an even degree of at least 2, got {degree}")
    order = [ids[i] for i in np.random.default_rng(seed).permutation(n)]
    out: dict[str, set[str]] = {c: set() for c in ids}
    for i, c in enumerate(order):
        for step in range(1, degree // 2 + 1):
            other = order[(i + step) % n]
            out[c].add(other)
            out[other].add(c)
    return {c: sorted(v) for c, v in out.items()}
