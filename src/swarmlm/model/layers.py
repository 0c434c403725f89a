"""The pieces of a block: norms, rotary position embedding, attention, MLP.

Attention reads its head count from tensor shapes (`q.view(B, T, -1, Dh)`), so tensor
parallelism can shard the q/k/v/o Linears from outside and the module still runs. Knows
nothing of checkpoints, caches' ownership or distribution: the cache is passed in.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from swarmlm.model.config import ModelConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 like the reference Llama."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    return nn.LayerNorm(cfg.dim, eps=cfg.norm_eps) if cfg.family == "gpt2" else RMSNorm(cfg.dim, cfg.norm_eps)


# ---- rotary position embedding ------------------------------------------------------------

def rope_inv_freq(cfg: ModelConfig, seq_len: int | None = None) -> torch.Tensor:
    """Inverse frequencies (Dh/2,) float32, with HF's linear / dynamic / llama3 scaling.

    `seq_len` matters only for "dynamic" (NTK) scaling: the base grows once the sequence
    passes max_seq_len. Since positions only grow during decoding, using this forward's
    largest position gives the same numbers as HF's stateful update.
    """
    dim = cfg.dh
    base = cfg.rope_theta
    kind, scaling = cfg.rope_type, cfg.rope_scaling or {}
    if kind == "dynamic" and seq_len is not None and seq_len > cfg.max_seq_len:
        factor = float(scaling["factor"])
        base = base * ((factor * seq_len / cfg.max_seq_len) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        inv_freq = _llama3_scale(inv_freq, scaling, cfg.max_seq_len)
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, s: dict, max_seq_len: int) -> torch.Tensor:
    # Llama 3.1: keep high frequencies, divide low ones by factor, blend in between
    factor, low, high = float(s["factor"]), float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old_len = float(s.get("original_max_position_embeddings", max_seq_len))
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


class Rotary:
    """Computes (cos, sin) tables for given positions; not an nn.Module, so `.to(dtype)` never
    touches its float32 frequencies."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.inv_freq = rope_inv_freq(cfg)            # (Dh/2,) float32
        self._on: dict[torch.device, torch.Tensor] = {}

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) long -> (cos, signed sin) each (B, 1, T, Dh) in `dtype`, for apply_rope.

        The sin table's first half is negated so that rotating is one roll and one multiply-add.
        """
        device = positions.device
        if self.cfg.rope_type == "dynamic":
            seq_len = int(positions.max()) + 1
            inv_freq = rope_inv_freq(self.cfg, seq_len).to(device)
        else:
            inv_freq = self._on.get(device)
            if inv_freq is None:
                inv_freq = self._on[device] = self.inv_freq.to(device)
        freqs = positions.float()[:, None, :, None] * inv_freq        # (B, 1, T, Dh/2)
        cos, sin = freqs.cos(), freqs.sin()
        return torch.cat((cos, cos), -1).to(dtype), torch.cat((-sin, sin), -1).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, Dh) rotated in HF's half-split layout (the layout of HF checkpoints):
    x * cos + concat(-x2, x1) * sin, where concat(x2, x1) = roll(x, Dh/2) and the sign is in the table."""
    return torch.addcmul(x * cos, torch.roll(x, x.shape[-1] // 2, -1), signed_sin)


# ---- attention and MLP --------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head attention with grouped-query k/v; writes new k/v into a caller-owned cache."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        Dh = cfg.dh
        self.head_dim = Dh
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * Dh, bias=cfg.attn_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * Dh, bias=cfg.attn_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * Dh, bias=cfg.attn_bias)
        self.o_proj = nn.Linear(cfg.n_heads * Dh, cfg.dim, bias=cfg.attn_out_bias)

    def forward(self, x: torch.Tensor, *, rope: tuple[torch.Tensor, torch.Tensor] | None,
                mask: torch.Tensor | None, is_causal: bool, kv: tuple[torch.Tensor, torch.Tensor] | None,
                start: int) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D).

        rope: (cos, sin) for these T positions, or None (gpt2). mask: bool (B, 1, T, S), True =
        may attend, or None with is_causal telling SDPA to build the causal mask itself.
        kv: this layer's cache buffers (B, Hkv, max_len, Dh); the new k/v are written at
        [start, start+T) and attention runs over [0, start+T). The caller advances the length.
        """
        B, T, _ = x.shape
        Dh = self.head_dim
        q = self.q_proj(x).view(B, T, -1, Dh).transpose(1, 2)  # (B, H, T, Dh)
        k = self.k_proj(x).view(B, T, -1, Dh).transpose(1, 2)  # (B, Hkv, T, Dh)
        v = self.v_proj(x).view(B, T, -1, Dh).transpose(1, 2)  # (B, Hkv, T, Dh)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv is not None:
            k_buf, v_buf = kv
            k_buf[:, :, start:start + T] = k
            v_buf[:, :, start:start + T] = v
            k, v = k_buf[:, :, :start + T], v_buf[:, :, :start + T]  # (B, Hkv, S, Dh)
        gqa = q.shape[1] != k.shape[1]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None,
                                             enable_gqa=gqa)  # (B, H, T, Dh)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))  # (B, T, D)


class MLP(nn.Module):
    """SwiGLU (llama) or GELU-tanh (gpt2) feed-forward."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.family == "llama"
        if self.gated:
            self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))
