"""T5: the encoder-decoder family (T5 v1.0, v1.1, Flan-T5), its config, cache and model.

What sets T5 apart from the decoder-only Transformer: no position embeddings but a learned
bias per (head, relative-position bucket), held by the first layer of each stack and shared
by all its layers (bidirectional buckets in the encoder, causal ones in the decoder); no
1/sqrt(Dh) scaling of attention scores; an RMS norm without mean or bias; a decoder that
also attends to the encoder's output (cross-attention, whose keys and values are computed
once per prompt and kept in the cache); v1.0 ties the lm head to the embedding and scales
the decoder output by d_model^-0.5, v1.1 does neither and gates its GELU feed-forward.

Knows nothing of files (t5_hf.py), sampling (t5_generate.py) or distribution.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from swarmlm.errors import UserError
from swarmlm.model.layers import RMSNorm

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu}


@dataclass(frozen=True)
class T5Config:
    family: ClassVar[str] = "t5"
    architecture: ClassVar[str] = "T5ForConditionalGeneration"
    vocab_size: int = 4096                # rows of the shared embedding and the lm head
    dim: int = 64                         # d_model
    n_heads: int = 4
    head_dim: int = 16                    # d_kv (T5 does not tie it to dim // n_heads)
    ffn_dim: int = 128                    # d_ff
    n_layers: int = 2                     # encoder blocks
    n_decoder_layers: int = 2             # decoder blocks
    n_buckets: int = 32                   # relative-position buckets
    max_distance: int = 128               # distances from here on share the last bucket
    activation: str = "relu"              # "relu" (v1.0) | "gelu_new" (v1.1, gated) | "gelu" | "silu"
    gated: bool = False                   # feed-forward is act(wi_0 x) * wi_1 x (v1.1) instead of act(wi x)
    norm_eps: float = 1e-6
    tie_embeddings: bool = True           # the lm head is the embedding matrix (v1.0)
    scale_head: bool = True               # decoder output times dim^-0.5 before the head (v1.0)
    max_seq_len: int = 512                # longest input / output we accept (the buckets themselves have no limit)
    pad_token_id: int = 0                 # padding, and what the decoder starts from by default
    eos_token_id: int = 1                 # end of sequence: ends the encoder input and each output row
    decoder_start_token_id: int = 0       # the decoder's first input token
    n_sentinels: int = 0                  # span-corruption sentinels: ids vocab_size-1, vocab_size-2, ... (training)

    def validate(self) -> "T5Config":
        """Raise UserError naming the first inconsistency; return self so it chains."""
        for name in ("vocab_size", "dim", "n_heads", "head_dim", "ffn_dim", "n_layers", "n_decoder_layers",
                     "n_buckets", "max_distance", "max_seq_len"):
            if int(getattr(self, name)) <= 0:
                raise UserError(f"T5 config {name} must be positive, got {getattr(self, name)}")
        if self.activation not in ACTIVATIONS:
            raise UserError(f"unsupported T5 activation {self.activation!r} (known: {', '.join(ACTIVATIONS)})")
        if self.n_buckets < 4 or self.max_distance <= self.n_buckets // 2:  # the log-spaced buckets need room
            raise UserError(f"T5 needs n_buckets >= 4 and max_distance > n_buckets / 2, "
                            f"got {self.n_buckets} and {self.max_distance}")
        for name in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise UserError(f"T5 config {name}={getattr(self, name)} is outside the vocabulary")
        if not 0 <= self.n_sentinels < self.vocab_size // 2:
            raise UserError(f"T5 config n_sentinels must be in [0, vocab_size / 2), got {self.n_sentinels}")
        if self.norm_eps <= 0:
            raise UserError(f"norm_eps must be positive, got {self.norm_eps}")
        return self

    @property
    def context_len(self) -> int:
        return self.max_seq_len

    def sentinel(self, k: int) -> int:
        """Id of the k-th span-corruption sentinel (T5's <extra_id_k>)."""
        return self.vocab_size - 1 - k

    def replace(self, **changes: Any) -> "T5Config":
        return dataclasses.replace(self, **changes)

    def n_params(self) -> int:
        D, Hd, F_ = self.dim, self.n_heads * self.head_dim, self.ffn_dim
        attn, ff = 4 * D * Hd, (3 if self.gated else 2) * D * F_
        enc = self.n_layers * (attn + ff + 2 * D) + self.n_buckets * self.n_heads + D
        dec = self.n_decoder_layers * (2 * attn + ff + 3 * D) + self.n_buckets * self.n_heads + D
        return self.vocab_size * D * (1 if self.tie_embeddings else 2) + enc + dec


# ---- relative positions -----------------------------------------------------------------------

def relative_bucket(rel: torch.Tensor, *, bidirectional: bool, n_buckets: int, max_distance: int) -> torch.Tensor:
    """Relative positions (key - query) long -> bucket ids, as Mesh TensorFlow's T5 computes them.

    Half the buckets (per direction) hold exact distances 0..n/2-1; the rest grow
    logarithmically up to max_distance, beyond which everything shares the last bucket. A causal
    stack (bidirectional=False) sees only keys at or before the query: later ones go to bucket 0.
    """
    out = torch.zeros_like(rel)
    if bidirectional:
        n_buckets //= 2
        out = (rel > 0).long() * n_buckets
        dist = rel.abs()
    else:
        dist = (-rel).clamp(min=0)
    exact = n_buckets // 2
    scaled = torch.log(dist.clamp(min=1).float() / exact) / math.log(max_distance / exact) * (n_buckets - exact)
    far = (exact + scaled.long()).clamp(max=n_buckets - 1)   # .long() truncates, like the reference
    return out + torch.where(dist < exact, dist, far)


def position_bias(table: nn.Embedding, n_queries: int, n_keys: int, past: int, *, bidirectional: bool,
                  cfg: T5Config) -> torch.Tensor:
    """The additive bias (1, H, T, S) for queries at slots [past, past+T) over keys [0, S)."""
    device = table.weight.device
    query = torch.arange(past, past + n_queries, device=device)[:, None]    # (T, 1)
    key = torch.arange(n_keys, device=device)[None, :]                    # (1, S)
    buckets = relative_bucket(key - query, bidirectional=bidirectional, n_buckets=cfg.n_buckets,
                              max_distance=cfg.max_distance)              # (T, S)
    return table(buckets).permute(2, 0, 1)[None]                          # (1, H, T, S)


def padding_bias(key_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | float:
    """key_mask (B, S) bool (True = real) -> additive (B, 1, 1, S): 0 or -inf; 0.0 when no mask."""
    if key_mask is None:
        return 0.0
    return torch.zeros(key_mask.shape, dtype=dtype, device=key_mask.device).masked_fill(
        ~key_mask, float("-inf"))[:, None, None, :]


# ---- layers ----------------------------------------------------------------------------------

class T5Attention(nn.Module):
    """Attention without score scaling; the bias (relative positions plus masks) is passed in."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        inner = cfg.n_heads * cfg.head_dim
        self.head_dim = cfg.head_dim
        self.q = nn.Linear(cfg.dim, inner, bias=False)
        self.k = nn.Linear(cfg.dim, inner, bias=False)
        self.v = nn.Linear(cfg.dim, inner, bias=False)
        self.o = nn.Linear(inner, cfg.dim, bias=False)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, S, D) -> k, v each (B, H, S, Dh)."""
        B, S, _ = x.shape
        k = self.k(x).view(B, S, -1, self.head_dim).transpose(1, 2)  # (B, H, S, Dh)
        v = self.v(x).view(B, S, -1, self.head_dim).transpose(1, 2)  # (B, H, S, Dh)
        return k, v

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, D) attends over k, v (B, H, S, Dh) with additive bias (B or 1, H or 1, T, S) -> (B, T, D)."""
        B, T, _ = x.shape
        q = self.q(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)
        if bias is not None:
            bias = bias.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)  # (B, H, T, Dh)
        return self.o(out.transpose(1, 2).reshape(B, T, -1))  # (B, T, D)


class T5FeedForward(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.act = ACTIVATIONS[cfg.activation]
        self.gated = cfg.gated
        if cfg.gated:
            self.wi_0 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
            self.wi_1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        else:
            self.wi = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.wo = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.wo(self.act(self.wi_0(x)) * self.wi_1(x))
        return self.wo(self.act(self.wi(x)))


class EncoderBlock(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = T5Attention(cfg)
        self.ff_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ff = T5FeedForward(cfg)

    def forward(self, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = self.attn_norm(h)
        h = h + self.attn(x, *self.attn.keys_values(x), bias)
        return h + self.ff(self.ff_norm(h))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = T5Attention(cfg)
        self.cross_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.cross = T5Attention(cfg)
        self.ff_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ff = T5FeedForward(cfg)

    def forward(self, h: torch.Tensor, *, self_bias: torch.Tensor, cross_kv: tuple[torch.Tensor, torch.Tensor],
                cross_bias: torch.Tensor | None, kv: tuple[torch.Tensor, torch.Tensor] | None,
                start: int) -> torch.Tensor:
        """h (B, T, D) -> (B, T, D). kv: this layer's self-attention buffers (B, H, max_len, Dh),
        written at [start, start+T); cross_kv: the encoder output's k, v (B, H, S, Dh)."""
        T = h.shape[1]
        x = self.attn_norm(h)
        k, v = self.attn.keys_values(x)                     # (B, H, T, Dh)
        if kv is not None:
            k_buf, v_buf = kv
            k_buf[:, :, start:start + T] = k
            v_buf[:, :, start:start + T] = v
            k, v = k_buf[:, :, :start + T], v_buf[:, :, :start + T]  # (B, H, start+T, Dh)
        h = h + self.attn(x, k, v, self_bias)
        h = h + self.cross(self.cross_norm(h), *cross_kv, cross_bias)
        return h + self.ff(self.ff_norm(h))


# ---- the cache ---------------------------------------------------------------------------------

class T5Cache:
    """What decoding keeps between steps: per decoder layer, the cross-attention k/v of the
    encoder output (computed once) and self-attention buffers (B, H, max_len, Dh)."""

    def __init__(self, cross: list[tuple[torch.Tensor, torch.Tensor]], enc_mask: torch.Tensor | None,
                 k: list[torch.Tensor], v: list[torch.Tensor]):
        self.cross = cross            # per decoder layer: (k, v) each (B, H, S, Dh)
        self.enc_mask = enc_mask      # (B, S) bool, True = real input token; None when nothing is padding
        self.k, self.v = k, v         # per decoder layer: (B, H, max_len, Dh)
        self.length = 0               # decoder slots filled

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2] if self.k else 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.cross for t in pair) + \
            sum(t.numel() * t.element_size() for t in (*self.k, *self.v))


# ---- the model --------------------------------------------------------------------------------

class T5(nn.Module):
    """Shared embedding, encoder stack, decoder stack, lm head (tied to the embedding in v1.0)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim, _weight=torch.empty(cfg.vocab_size, cfg.dim))
        self.encoder = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.n_layers))
        self.encoder_bias = nn.Embedding(cfg.n_buckets, cfg.n_heads, _weight=torch.empty(cfg.n_buckets, cfg.n_heads))
        self.encoder_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.decoder = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.n_decoder_layers))
        self.decoder_bias = nn.Embedding(cfg.n_buckets, cfg.n_heads, _weight=torch.empty(cfg.n_buckets, cfg.n_heads))
        self.decoder_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.init_weights()
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """T5's own init (Mesh TensorFlow): each matrix N(0, fan_in^-1/2), q also over Dh, the embedding N(0, 1)."""
        if any(p.is_meta for p in self.parameters()):
            return  # a shell for a checkpoint (t5_hf.load_t5)
        cfg = self.cfg
        nn.init.normal_(self.embed.weight, std=1.0)
        for table in (self.encoder_bias, self.decoder_bias):
            nn.init.normal_(table.weight, std=cfg.dim ** -0.5)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and m is not self.lm_head:
                last = name.rsplit(".", 1)[-1]
                fan_in = m.in_features * (cfg.head_dim if last == "q" else 1)
                nn.init.normal_(m.weight, std=fan_in ** -0.5)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        if not cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=cfg.dim ** -0.5)

    def encode(self, input_ids: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, S), key_mask (B, S) bool or None -> encoder output (B, S, D)."""
        S = input_ids.shape[1]
        h = self.embed(input_ids)                                            # (B, S, D)
        bias = position_bias(self.encoder_bias, S, S, 0, bidirectional=True, cfg=self.cfg) \
            + padding_bias(key_mask, h.dtype)                                # (B or 1, H, S, S)
        for block in self.encoder:
            h = block(h, bias)
        return self.encoder_norm(h)

    def cross_keys_values(self, enc: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The encoder output's k, v for every decoder layer, computed once per prompt."""
        return [block.cross.keys_values(enc) for block in self.decoder]

    def new_cache(self, enc: torch.Tensor, enc_mask: torch.Tensor | None, max_len: int) -> T5Cache:
        B = enc.shape[0]
        shape = (B, self.cfg.n_heads, max_len, self.cfg.head_dim)
        k = [torch.zeros(shape, dtype=enc.dtype, device=enc.device) for _ in self.decoder]
        v = [torch.zeros(shape, dtype=enc.dtype, device=enc.device) for _ in self.decoder]
        return T5Cache(self.cross_keys_values(enc), enc_mask, k, v)

    def decode(self, ids: torch.Tensor, *, cross: list[tuple[torch.Tensor, torch.Tensor]],
               enc_mask: torch.Tensor | None, cache: T5Cache | None = None) -> torch.Tensor:
        """Decoder ids (B, T) -> logits (B, T, V). With a cache, ids continue at slot cache.length."""
        T = ids.shape[1]
        past = 0
        if cache is not None:
            if cache.length + T > cache.max_len:
                raise UserError(f"T5 cache full: {cache.length} + {T} tokens > max_len {cache.max_len}")
            past = cache.length
        h = self.embed(ids)                                                  # (B, T, D)
        S = past + T
        self_bias = position_bias(self.decoder_bias, T, S, past, bidirectional=False, cfg=self.cfg)  # (1, H, T, S)
        slots = torch.arange(S, device=ids.device)
        future = slots[None, :] > slots[past:, None]                         # (T, S)
        self_bias = self_bias.masked_fill(future, float("-inf"))
        cross_bias = None if enc_mask is None else padding_bias(enc_mask, h.dtype)  # (B, 1, 1, S_enc)
        for i, block in enumerate(self.decoder):
            kv = (cache.k[i], cache.v[i]) if cache is not None else None
            h = block(h, self_bias=self_bias, cross_kv=cross[i], cross_bias=cross_bias, kv=kv, start=past)
        if cache is not None:
            cache.length += T
        h = self.decoder_norm(h)
        if self.cfg.scale_head:
            h = h * self.cfg.dim ** -0.5
        return self.lm_head(h)                                               # (B, T, V)

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits (B, T, V) of decoder_input_ids (B, T) given input_ids (B, S)."""
        enc = self.encode(input_ids, key_mask)
        return self.decode(decoder_input_ids, cross=self.cross_keys_values(enc), enc_mask=key_mask)


def shift_right(labels: torch.Tensor, cfg: T5Config) -> torch.Tensor:
    """Decoder inputs (B, T) for target labels (B, T): the start token, then labels[:-1] (-100 -> pad)."""
    out = torch.full_like(labels, cfg.decoder_start_token_id)
    out[:, 1:] = labels[:, :-1]
    return out.masked_fill(out == -100, cfg.pad_token_id)


def t5_loss(model: T5, input_ids: torch.Tensor, key_mask: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over label positions that are not -100."""
    logits = model(input_ids, shift_right(labels, model.cfg), key_mask)  # (B, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=-100)


PRESETS: dict[str, T5Config] = {
    # a v1.1-style model (gated GELU, untied head) that trains in seconds on CPU; vocab_size is set from the tokenizer
    "t5-tiny": T5Config(vocab_size=4096, dim=64, n_heads=4, head_dim=16, ffn_dim=128, n_layers=2, n_decoder_layers=2,
                        activation="gelu_new", gated=True, tie_embeddings=False, scale_head=False, max_seq_len=256,
                        n_sentinels=32),
}
