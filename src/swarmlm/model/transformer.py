"""Transformer: embeddings, a dict of blocks keyed by absolute index, final norm and lm head.

Built torchtitan-style so parallel and swarm code can cut it from outside: any part may be
absent (`Transformer(cfg, layers=range(8, 16), with_embed=False, with_head=False)` holds only
blocks 8-15), and a pipeline stage may delete parts after construction; `forward` runs
whatever is present, in order. Knows nothing of distribution, files or sampling.

Batches of different-length prompts are LEFT padded: `key_mask` (B, S) marks real tokens
(True) over all keys, and `positions` (B, T) gives each row its own position ids, so a
padded row computes exactly what it would alone.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from swarmlm.errors import UserError
from swarmlm.model.block import Block
from swarmlm.model.cache import KVCache
from swarmlm.model.config import ModelConfig
from swarmlm.model.layers import RMSNorm, Rotary, make_norm


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, *, layers: range | None = None, with_embed: bool = True,
                 with_head: bool = True):
        super().__init__()
        cfg.validate()
        layers = range(cfg.n_layers) if layers is None else layers
        if len(layers) and (layers.start < 0 or layers.stop > cfg.n_layers or layers.step != 1):
            raise UserError(f"block range {layers.start}:{layers.stop} is outside the model's 0:{cfg.n_layers}")
        self.cfg = cfg
        self.layer_range = layers
        self.tok_embeddings = _embedding(cfg.vocab_size, cfg.dim) if with_embed else None
        self.pos_embeddings = _embedding(cfg.max_seq_len, cfg.dim) if with_embed and cfg.family == "gpt2" else None
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in layers})
        self.norm = make_norm(cfg) if with_head else None
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False) if with_head else None
        self.rotary = Rotary(cfg) if cfg.family == "llama" else None
        self.init_weights()
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the lm head with the token embedding when the config says so and both are here."""
        if self.cfg.tie_embeddings and self.output is not None and self.tok_embeddings is not None:
            self.output.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """GPT-2 style init: N(0, std), residual projections scaled by 1/sqrt(2 * n_layers)."""
        if any(p.is_meta for p in self.parameters()):
            return  # a shell to be filled from a checkpoint (hf.load_model); normal_ on meta imports torch._dynamo (~8 s)
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, m in self.named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                last = name.rsplit(".", 1)[-1]
                nn.init.normal_(m.weight, std=out_std if last in ("o_proj", "down_proj") else std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    # ---- the three parts ------------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) long -> hidden states (B, T, D)."""
        h = self.tok_embeddings(input_ids)  # (B, T, D)
        if self.pos_embeddings is not None:
            if positions is None:
                positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
            h = h + self.pos_embeddings(positions)  # (B, T, D)
        return h

    def run_blocks(self, h: torch.Tensor, *, start: int | None = None, end: int | None = None,
                   cache: KVCache | None = None, positions: torch.Tensor | None = None,
                   key_mask: torch.Tensor | None = None, advance: bool = True) -> torch.Tensor:
        """Run the held blocks with index in [start, end) on h (B, T, D) -> (B, T, D).

        key_mask: bool over all keys (B, past+T), or just the new ones (B, T); only the last T
        columns are read when a cache is given (it remembers the rest). positions (B, T) default to
        each row's continuation (from the cache, else 0..T-1 counting only real tokens).
        With a cache, k/v go to slots [cache.length, +T) and the cache advances once at the end.
        """
        B, T, _ = h.shape
        new_mask = None if key_mask is None else key_mask[:, -T:]
        if positions is None:
            positions = self.default_positions(T, cache=cache, key_mask=key_mask, device=h.device)
        past = 0
        if cache is not None:
            cache.check_room(T)
            past = cache.length
            full_mask = cache.key_mask(new_mask, T)
        else:
            full_mask = None if key_mask is None or bool(key_mask.all()) else key_mask
        masks = {False: (*attention_mask(full_mask, past, T, h.device), 0)}
        if any(self.cfg.windowed(int(key)) for key in self.layers):
            # a windowed layer reads only the cached slots some new query can see, from `first` on
            W = self.cfg.sliding_window
            first = max(0, past + 1 - W) if cache is not None else 0
            mask, is_causal = attention_mask(full_mask, past, T, h.device, window=W)
            masks[True] = (None if mask is None else mask[..., first:], is_causal, first)
        rope = self.rotary.tables(positions, h.dtype) if self.rotary is not None else None
        lo = -1 if start is None else start
        hi = float("inf") if end is None else end
        for key, block in self.layers.items():
            i = int(key)
            if lo <= i < hi:
                mask, is_causal, first = masks[self.cfg.windowed(i)]
                kv = None
                if cache is not None:
                    k, v = cache.layer(i)
                    kv = (k[:, :, first:], v[:, :, first:])   # views: writes land in the cache
                h = block(h, rope=rope, mask=mask, is_causal=is_causal, kv=kv, start=past - first)
        if cache is not None and advance:
            cache.advance(T, new_mask)
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, T, D) -> logits (B, T, V): final norm, then the lm head."""
        if self.norm is not None:
            h = self.norm(h)
        return self.output(h)

    def forward(self, x: torch.Tensor, *, cache: KVCache | None = None, positions: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T) or hidden states (B, T, D) -> logits (B, T, V) or hidden states.

        Each present part runs in order: embedding (when held), blocks, head (when held).
        """
        T = x.shape[1]
        if positions is None:
            positions = self.default_positions(T, cache=cache, key_mask=key_mask, device=x.device)
        h = self.embed(x, positions) if self.tok_embeddings is not None else x
        h = self.run_blocks(h, cache=cache, positions=positions, key_mask=key_mask)
        return self.head(h) if self.output is not None else h

    def default_positions(self, T: int, *, cache: KVCache | None, key_mask: torch.Tensor | None,
                          device: torch.device) -> torch.Tensor:
        """Position ids (B, T) (or (1, T) when every row is the same) of the next T tokens."""
        new_mask = None if key_mask is None else key_mask[:, -T:]
        if cache is not None:
            return cache.positions(new_mask, T)
        if new_mask is None:
            return torch.arange(T, device=device)[None]
        return (new_mask.long().cumsum(1) - 1).clamp(min=0)


def attention_mask(key_mask: torch.Tensor | None, past: int, T: int, device: torch.device,
                   window: int | None = None) -> tuple[torch.Tensor | None, bool]:
    """(mask (B or 1, 1, T, S) bool or None, is_causal) for T queries at slots [past, past+T).

    A query sees earlier slots that are real tokens, and always itself, so a padding query
    gets a finite (unused) output instead of NaN. With a sliding `window` W it sees only slots
    q - W < k <= q, counted in slots (padding included), as transformers counts them.
    """
    S = past + T
    if window is not None and S <= window:
        window = None                       # every key is within reach
    if key_mask is None and window is None:
        if T == 1:
            return None, False              # one new token sees every key
        if past == 0:
            return None, True               # plain causal: SDPA builds it
    slots = torch.arange(S, device=device)
    query_slots = slots[past:, None]        # (T, 1)
    causal = slots[None, :] <= query_slots  # (T, S)
    if window is not None:
        causal = causal & (slots[None, :] > query_slots - window)  # (T, S)
    if key_mask is None:
        return causal[None, None], False    # (1, 1, T, S)
    allowed = causal[None] & key_mask[:, None, :]    # (B, T, S)
    allowed = allowed | (slots[None, :] == query_slots)[None]  # the diagonal
    return allowed[:, None], False          # (B, 1, T, S)


def _embedding(n: int, dim: int) -> nn.Embedding:
    """An embedding left uninitialized: `init_weights` or a checkpoint fills it. nn.Embedding's own
    normal_ init on the meta device costs seconds on first use (it traces a decomposition)."""
    return nn.Embedding(n, dim, _weight=torch.empty(n, dim))
