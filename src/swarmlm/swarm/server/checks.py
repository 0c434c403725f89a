"""RequestChecks: what a host's requests must fit before any of them runs.

Each check takes a field as it came off the wire and either returns it, checked, or raises
`WireError` (a malformed field) or `CapacityError` (more than the budget allows for one
request), which the peer turns into an error reply. host.py (sessions) and spans.py (stateless
forward and backward) share them. Knows nothing of sessions, caches or the network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from swarmlm import serialize
from swarmlm.errors import WireError
from swarmlm.swarm import wire
from swarmlm.swarm.server.budget import Budget


@dataclass(frozen=True)
class RequestChecks:
    start: int                   # the host's span [start, end)
    end: int
    dtype: torch.dtype           # hidden states and prompts arrive in the host's compute dtype
    dim: int                     # D: the model's width
    budget: Budget               # the per-request limits (rows, tokens)

    def span(self, start: int, end: int) -> None:
        if not (self.start <= start < end <= self.end):
            raise WireError(f"this server holds blocks {self.start}:{self.end}, not {start}:{end}")

    def hidden(self, t: Any, *, batch: int | None = None, name: str = "hidden") -> torch.Tensor:
        serialize.check_tensor(t, name=name, dtype=self.dtype, shape=(batch, None, self.dim), finite=True)
        B, T, _ = t.shape
        if B == 0 or T == 0:
            raise WireError(f"{name} is empty: shape {tuple(t.shape)}")
        self.budget.check_request(B, B * T)
        return t

    @staticmethod
    def mask(mask: Any, B: int, T: int) -> torch.Tensor | None:
        if mask is None:
            return None
        return serialize.check_tensor(mask, name="key_mask", dtype=torch.bool, shape=(B, T))

    def prompts(self, prompts: Any, start: int, end: int, B: int, T: int) -> torch.Tensor | None:
        if prompts is None:
            return None
        serialize.check_tensor(prompts, name="prompts", dtype=self.dtype, shape=(end - start, None, None, self.dim),
                               finite=True)
        if prompts.shape[1] not in (1, B) or not 0 < prompts.shape[2] <= T:
            raise WireError(f"prompts have shape {tuple(prompts.shape)}; need ({end - start}, 1 or {B}, P <= {T}, "
                            f"{self.dim})")
        return prompts

    @staticmethod
    def chunks(chunks: list[int] | None, T: int) -> list[int]:
        if chunks is None:
            return [T]
        if not chunks or any(n <= 0 for n in chunks) or sum(chunks) != T:
            raise WireError(f"chunks must be positive sizes summing to {T}")
        return chunks

    @staticmethod
    def keep_id(keep_id: bytes | None) -> None:
        if keep_id is not None and len(keep_id) != wire.KEEP_ID_BYTES:
            raise WireError(f"a keep id has {wire.KEEP_ID_BYTES} bytes, got {len(keep_id)}")
