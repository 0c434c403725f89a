"""Replicated secret shares, as one party holds them, and the client's sharing / reconstruction.

A secret x in Z_2^64 is split into three components x = x0 + x1 + x2; party i holds
(x_i, x_{i+1}) (indices mod 3), so any two parties can rebuild x and any one party sees two
uniform ring elements. `AShare` is that pair (arithmetic, int64); `BShare` is the same with
XOR instead of + over bool tensors (bit decomposition, comparisons). Linear operations are
local; a public constant is added to component 0 (held by parties 0 and 2).
Knows nothing of messages: ops.py does the interactive parts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from swarmlm.privacy.mpc.ring import Prg

N = 3


@dataclass
class AShare:
    a: torch.Tensor          # component i (int64)
    b: torch.Tensor          # component i+1

    @property
    def shape(self) -> torch.Size:
        return self.a.shape

    def __add__(self, o: "AShare") -> "AShare":
        return AShare(self.a + o.a, self.b + o.b)

    def __sub__(self, o: "AShare") -> "AShare":
        return AShare(self.a - o.a, self.b - o.b)

    def __neg__(self) -> "AShare":
        return AShare(-self.a, -self.b)

    def scale(self, k: torch.Tensor | int) -> "AShare":
        """Times a public integer (tensor): no truncation needed."""
        return AShare(self.a * k, self.b * k)

    def map(self, fn) -> "AShare":
        """Apply a linear, shape-only or public-integer function to both components."""
        return AShare(fn(self.a), fn(self.b))

    def add_public(self, index: int, c: torch.Tensor | int) -> "AShare":
        """x + c for a public ring value c (already encoded); broadcasts like + does."""
        c = torch.as_tensor(c, dtype=torch.int64)
        zero = torch.zeros_like(c)
        return AShare(self.a + (c if index == 0 else zero), self.b + (c if index == 2 else zero))


def cat(shares: list[AShare], dim: int) -> AShare:
    return AShare(torch.cat([s.a for s in shares], dim), torch.cat([s.b for s in shares], dim))


@dataclass
class BShare:
    a: torch.Tensor          # component i (bool)
    b: torch.Tensor          # component i+1

    def __xor__(self, o: "BShare") -> "BShare":
        return BShare(self.a ^ o.a, self.b ^ o.b)

    def map(self, fn) -> "BShare":
        return BShare(fn(self.a), fn(self.b))

    def xor_public(self, index: int, c: torch.Tensor) -> "BShare":
        zero = torch.zeros_like(c)
        return BShare(self.a ^ (c if index == 0 else zero), self.b ^ (c if index == 2 else zero))


# ---- the client's side: split a secret, rebuild an output ---------------------------------

def split(x: torch.Tensor, prg: Prg | None = None) -> list[AShare]:
    """A ring tensor -> the three parties' shares (fresh uniform components)."""
    prg = prg or Prg(os.urandom(32), "split")
    c0, c1 = prg.ring(x.shape), prg.ring(x.shape)
    comps = [c0, c1, x - c0 - c1]
    return [AShare(comps[i], comps[(i + 1) % N]) for i in range(N)]


def combine(components: list[torch.Tensor]) -> torch.Tensor:
    """The three components (party i sends its x_i) -> the ring value."""
    return components[0] + components[1] + components[2]

