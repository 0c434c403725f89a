"""KVCache: preallocated key/value buffers for a span of blocks, owned by the caller.

One cache holds, for each block index it covers, k and v buffers (B, Hkv, max_len, Dh), plus
`length` (slots filled, the same for every row), a key padding mask (B, max_len) (False =
left padding, never attended) and each row's next position. A swarm server keeps one per
session for its span; local generation keeps one for the whole model.

Who advances it: each block writes its new k/v at [length, length+T); then
`Transformer.run_blocks` calls `advance(T)` once, after its last block (pass
`advance=False` to run_blocks when splitting one forward over several calls, then call
`advance` yourself). Knows nothing of models beyond the config's shapes.
"""

from __future__ import annotations

import torch

from swarmlm.errors import UserError
from swarmlm.model.config import ModelConfig


class KVCache:
    def __init__(self, k: dict[int, torch.Tensor], v: dict[int, torch.Tensor], mask: torch.Tensor,
                 next_pos: torch.Tensor, length: int = 0, has_padding: bool = False):
        self.k = k                    # block index -> (B, Hkv, max_len, Dh)
        self.v = v                    # block index -> (B, Hkv, max_len, Dh)
        self.mask = mask              # (B, max_len) bool: True = a real token; valid in [:length]
        self.next_pos = next_pos      # (B,) long: position id of each row's next token
        self.length = length          # slots filled, shared by all rows
        self.has_padding = has_padding  # some slot in [:length] is False (lets decoding skip the mask)

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_len: int, *, layers: range | None = None,
              dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
              n_kv_heads: int | None = None) -> "KVCache":
        """Buffers for `layers` (default: every block). `n_kv_heads` overrides the config's for a
        tensor-parallel shard that holds only some heads."""
        layers = range(cfg.n_layers) if layers is None else layers
        shape = (batch, n_kv_heads or cfg.n_kv_heads, max_len, cfg.dh)
        k = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}
        v = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}
        mask = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        return cls(k, v, mask, torch.zeros(batch, dtype=torch.long, device=device))

    @property
    def batch(self) -> int:
        return self.mask.shape[0]

    @property
    def max_len(self) -> int:
        return self.mask.shape[1]

    @property
    def layers(self) -> list[int]:
        return sorted(self.k)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (k, v) buffers of block `index`."""
        if index not in self.k:
            raise KeyError(f"this cache does not cover block {index} (covers {self.layers})")
        return self.k[index], self.v[index]

    def check_room(self, n_new: int) -> None:
        if self.length + n_new > self.max_len:
            raise UserError(f"KV cache full: {self.length} + {n_new} tokens > max_len {self.max_len}")

    def key_mask(self, new_mask: torch.Tensor | None, n_new: int) -> torch.Tensor | None:
        """Record `new_mask` (B, T) for the next T slots; return the mask over all keys (B, length+T),
        or None when no slot is padding."""
        end = self.length + n_new
        if new_mask is not None:
            self.mask[:, self.length:end] = new_mask
            if not self.has_padding and not bool(new_mask.all()):
                self.has_padding = True
        elif self.has_padding:
            self.mask[:, self.length:end] = True
        return self.mask[:, :end] if self.has_padding else None

    def positions(self, new_mask: torch.Tensor | None, n_new: int) -> torch.Tensor:
        """Position ids (B, T) of the next T tokens: each row continues from its own count of real tokens."""
        if new_mask is None:
            steps = torch.arange(n_new, device=self.next_pos.device)
        else:
            steps = (new_mask.long().cumsum(1) - 1).clamp(min=0)  # (B, T)
        return self.next_pos[:, None] + steps

    def advance(self, n_new: int, new_mask: torch.Tensor | None = None) -> None:
        """Mark T more slots filled (once per forward, not per layer)."""
        self.next_pos += n_new if new_mask is None else new_mask.sum(1)
        self.length += n_new

    def trim(self, length: int) -> None:
        """Roll back to the first `length` slots (e.g. to retry or to drop rejected tokens)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot trim a cache of length {self.length} to {length}")
        self.length = length
        self.next_pos = self.mask[:, :length].sum(1)
        self.has_padding = not bool(self.mask[:, :length].all())

    def select(self, batch_indices: torch.Tensor | list[int]) -> None:
        """Keep only the given rows, in that order (e.g. drop finished sequences)."""
        idx = torch.as_tensor(batch_indices, dtype=torch.long, device=self.mask.device)
        for i in self.k:
            self.k[i] = self.k[i].index_select(0, idx)
            self.v[i] = self.v[i].index_select(0, idx)
        self.mask = self.mask.index_select(0, idx)
        self.next_pos = self.next_pos.index_select(0, idx)
        self.has_padding = not bool(self.mask[:, :self.length].all())

    def reset(self) -> None:
        self.length = 0
        self.has_padding = False
        self.mask.fill_(True)
        self.next_pos.zero_()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.k, self.v) for t in d.values())
