"""A lean one-token decode step: the same numbers as `Transformer.run_blocks`, fewer small ops.

Decoding one token per row spends most of its time outside the matmuls on a CPU: the rotary
tables recomputed every step, the attention mask rebuilt, position ids counted, a module call
per piece, seven small matmuls per block. `DecodeStep(model, cache)` does that work once: the
rotary tables for every slot of the cache are computed up front (with the very ops
`Rotary.tables` uses, so the values are bit for bit the same), the mask is the cache's own
padding mask or nothing, and each layer runs as a flat list of the model's own modules and
tensor ops, in the order Attention and Block use them, except that for one row (B = 1) q/k/v
and gate/up run as one matmul each (`fused_projections`: the parts' weights become views of
the fused ones, so no memory is added). Each output row is the same dot product either way,
and the tests check that the output equals `run_blocks`' exactly, for float and quantized
(model/quant.py) weights alike, so the swarm's exactness promise holds (with more rows a float
GEMM may block its sums differently, so those steps use the parts).

It applies to a step of one new token per row with a cache, for models whose rotary scaling
does not depend on the sequence length (not "dynamic") and that attend to the whole context (no
sliding window); `DecodeStep.supports` says which.
Knows nothing of sampling or networks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from swarmlm.model.cache import KVCache
from swarmlm.model.layers import apply_rope
from swarmlm.model.quant import QuantLinear


def _concat_linears(parts: list[nn.Linear]) -> nn.Linear | None:
    """One float Linear over the parts' rows. Each part keeps its Parameter objects (an optimizer
    holding them still updates the model), whose data become views of the fused tensors."""
    first = parts[0]
    if not all(type(p) is nn.Linear and p.in_features == first.in_features and (p.bias is None) == (first.bias is None)
               and p.weight.dtype == first.weight.dtype and p.weight.device == first.weight.device for p in parts):
        return None
    fused = nn.Linear(first.in_features, sum(p.out_features for p in parts), bias=first.bias is not None,
                      device="meta")
    fused.weight = nn.Parameter(torch.cat([p.weight.detach() for p in parts]), requires_grad=False)
    if first.bias is not None:
        fused.bias = nn.Parameter(torch.cat([p.bias.detach() for p in parts]), requires_grad=False)
    row = 0
    for p in parts:
        rows = slice(row, row + p.out_features)
        p.weight.data = fused.weight.data[rows]
        if p.bias is not None:
            p.bias.data = fused.bias.data[rows]
        row += p.out_features
    return fused


def fuse(parts: list[nn.Module]) -> tuple[nn.Module, list[int]] | None:
    """(one module computing the parts' outputs side by side, their widths), or None if they cannot be fused.

    Each output row is the same dot product over the same input either way, so the fused
    result equals the parts' (checked by the tests against the unfused path)."""
    fused = QuantLinear.concat(parts) if isinstance(parts[0], QuantLinear) else _concat_linears(parts)
    return None if fused is None else (fused, [p.out_features for p in parts])


def _storage(module: nn.Module) -> int:
    t = module.qweight if isinstance(module, QuantLinear) else module.weight
    return t.untyped_storage().data_ptr()


def _still_shared(entry: tuple, block) -> bool:
    """Whether the parts still read the fused weights (not moved, reloaded or replaced since)."""
    qkv, gate_up = entry
    pairs = [(qkv, block.attention.q_proj)] + ([(gate_up, block.feed_forward.gate_proj)] if gate_up else [])
    return all(f is None or _storage(f[0]) == _storage(part) for f, part in pairs)


def fused_projections(model) -> dict[int, tuple]:
    """Block index -> (fused q/k/v or None, fused gate/up or None), built once per model and kept on it."""
    cached = getattr(model, "_fused_projections", None)
    if cached is None or set(cached) != {int(k) for k in model.layers} or not all(
            _still_shared(cached[int(k)], b) for k, b in model.layers.items()):
        cached = {}
        for key, block in model.layers.items():
            attn, mlp = block.attention, block.feed_forward
            qkv = fuse([attn.q_proj, attn.k_proj, attn.v_proj])
            gate_up = fuse([mlp.gate_proj, mlp.up_proj]) if mlp.gated else None
            cached[int(key)] = (qkv, gate_up)
        object.__setattr__(model, "_fused_projections", cached)   # not a submodule: no state_dict entries
    return cached


class DecodeStep:
    """`step(ids (B, 1)) -> logits (B, V)` of the last position, advancing `cache` by one slot."""

    def __init__(self, model, cache: KVCache, *, with_head: bool = True):
        if not self.supports(model):
            raise ValueError("DecodeStep needs a model without dynamic rotary scaling")
        self.model = model
        self.cache = cache
        self.with_head = with_head
        self.layers = []
        fused = fused_projections(model)
        for key, block in model.layers.items():
            attn, mlp = block.attention, block.feed_forward
            qkv, gate_up = fused[int(key)]
            self.layers.append((int(key), block.attention_norm, qkv, (attn.q_proj, attn.k_proj, attn.v_proj),
                                attn.o_proj, attn.head_dim, block.ffn_norm, gate_up, mlp))
        self.tables = None
        if model.rotary is not None:
            # every slot's (cos, signed sin), as Rotary.tables computes them: (max_len, Dh) each
            dtype = next(iter(cache.k.values())).dtype if cache.k else torch.float32
            positions = torch.arange(cache.max_len, device=cache.mask.device)[None]
            cos, sin = model.rotary.tables(positions, dtype)          # (1, 1, max_len, Dh)
            self.tables = (cos[0, 0], sin[0, 0])

    @staticmethod
    def supports(model) -> bool:
        # a sliding window (Mistral, Qwen2) reads a window of the cache per layer: run_blocks' path
        return (model.rotary is None or model.cfg.rope_type != "dynamic") and model.cfg.sliding_window is None

    def _rope(self, B: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.tables is None:
            return None
        cos, sin = self.tables
        pos = self.cache.next_pos                                      # (B,)
        if B == 1:
            p = int(pos[0])
            return cos[p:p + 1][None, None], sin[p:p + 1][None, None]  # (1, 1, 1, Dh)
        return cos[pos][:, None, None], sin[pos][:, None, None]        # (B, 1, 1, Dh)

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        model, cache = self.model, self.cache
        B = ids.shape[0]
        cache.check_room(1)
        past = cache.length
        positions = cache.next_pos[:, None]                            # (B, 1)
        h = model.embed(ids, positions) if model.tok_embeddings is not None else ids
        h = self.run(h)
        return model.head(h)[:, 0] if self.with_head else h

    def run(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, 1, D) of the next slot through every held block; advances the cache."""
        cache = self.cache
        B = h.shape[0]
        past = cache.length
        mask = cache.key_mask(None, 1)                                 # (B, S) when some slot is padding
        if mask is not None:
            mask = mask[:, None, None, :]                              # (B, 1, 1, S)
        rope = self._rope(B)
        end = past + 1
        for i, norm1, qkv, projections, o_proj, Dh, norm2, gate_up, mlp in self.layers:
            x = norm1(h)
            if qkv is not None and B == 1:
                q, k, v = qkv[0](x).split(qkv[1], -1)
            else:
                q, k, v = (p(x) for p in projections)
            q = q.view(B, 1, -1, Dh).transpose(1, 2)                   # (B, H, 1, Dh)
            k = k.view(B, 1, -1, Dh).transpose(1, 2)                   # (B, Hkv, 1, Dh)
            v = v.view(B, 1, -1, Dh).transpose(1, 2)
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            k_buf, v_buf = cache.k[i], cache.v[i]
            k_buf[:, :, past:end] = k
            v_buf[:, :, past:end] = v
            k, v = k_buf[:, :, :end], v_buf[:, :, :end]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
            h = h + o_proj(out.transpose(1, 2).reshape(B, 1, -1))
            if gate_up is not None and B == 1:
                g, u = gate_up[0](norm2(h)).split(gate_up[1], -1)
                h = h + mlp.down_proj(F.silu(g) * u)
            else:
                h = h + mlp(norm2(h))
        cache.advance(1)
        return h
