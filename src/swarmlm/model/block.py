"""Block: one pre-norm Transformer layer, h + attn(norm(h)) then h + mlp(norm(h)).

Runs on whatever hidden states it is given; the positions' rotary tables, the attention
mask and the cache slot come from the caller (Transformer.run_blocks), computed once per
forward rather than once per layer.
"""

from __future__ import annotations

import torch
from torch import nn

from swarmlm.model.config import ModelConfig
from swarmlm.model.layers import MLP, Attention, make_norm


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = make_norm(cfg)
        self.attention = Attention(cfg)
        self.ffn_norm = make_norm(cfg)
        self.feed_forward = MLP(cfg)

    def forward(self, h: torch.Tensor, *, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None, is_causal: bool = True,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None, start: int = 0) -> torch.Tensor:
        """h (B, T, D) -> (B, T, D); see Attention.forward for rope, mask, kv and start."""
        h = h + self.attention(self.attention_norm(h), rope=rope, mask=mask, is_causal=is_causal, kv=kv, start=start)
        return h + self.feed_forward(self.ffn_norm(h))
