"""ModelConfig: the shape of a decoder-only Transformer, and the ready-made presets.

Two families cover the checkpoints we read and write: "gpt2" (learned positions, LayerNorm,
GELU MLP, biases everywhere) and "llama" (RoPE, RMSNorm, SwiGLU, grouped-query attention;
also Qwen2 and Mistral, which differ only in biases). Knows nothing of files or tensors:
hf.py maps config.json to and from this class.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from swarmlm.errors import UserError

FAMILIES = ("gpt2", "llama")
ARCHITECTURES = {  # HF class name -> family
    "GPT2LMHeadModel": "gpt2",
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "MistralForCausalLM": "llama",
}
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    family: str = "llama"                 # "gpt2" | "llama": which block layout to build
    architecture: str = "LlamaForCausalLM"  # HF class name written to config.json on save
    vocab_size: int = 4096                # rows of the embedding and the lm head
    dim: int = 64                         # residual stream width D
    n_layers: int = 2                     # number of Transformer blocks
    n_heads: int = 4                      # query heads H
    n_kv_heads: int = 2                   # key/value heads (grouped-query attention); divides n_heads
    head_dim: int | None = None           # per-head width Dh; None -> dim // n_heads
    ffn_dim: int = 176                    # hidden width of the MLP
    max_seq_len: int = 256                # context length (gpt2: rows of the position table)
    norm_eps: float = 1e-5                # epsilon of RMSNorm / LayerNorm
    rope_theta: float = 10000.0           # RoPE base frequency (llama family only)
    rope_scaling: dict[str, Any] | None = None  # None or HF's dict: {"rope_type": "llama3"|"linear"|"dynamic", "factor": ...}
    tie_embeddings: bool = False          # the lm head shares the token embedding matrix
    attn_bias: bool = False               # bias on q/k/v projections (gpt2, Qwen2)
    attn_out_bias: bool = False           # bias on the attention output projection (gpt2; llama with attention_bias)
    mlp_bias: bool = False                # bias on the MLP projections (gpt2)
    bos_token_id: int | None = None       # begin-of-sequence id, if the model has one
    eos_token_id: int | None = None       # end-of-sequence id; generation stops a row on it
    sliding_window: int | None = None     # llama family: a query sees only the last W slots (itself included)
    window_from_layer: int = 0            # blocks with index >= this use the window (Qwen2's max_window_layers)

    @property
    def dh(self) -> int:
        """Per-head width."""
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

    @property
    def rope_type(self) -> str:
        if self.rope_scaling is None:
            return "default"
        return str(self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default")))

    @property
    def context_len(self) -> int:
        """Longest sequence the model can attend over (dynamic NTK scaling extends max_seq_len)."""
        if self.rope_type == "dynamic":
            return int(self.max_seq_len * float(self.rope_scaling.get("factor", 1.0)))
        return self.max_seq_len

    def validate(self) -> "ModelConfig":
        """Raise UserError naming the first inconsistency; return self so it chains."""
        if self.family not in FAMILIES:
            raise UserError(f"model family must be one of {FAMILIES}, got {self.family!r}")
        if self.architecture not in ARCHITECTURES:
            raise UserError(f"unsupported architecture {self.architecture!r} (known: {', '.join(ARCHITECTURES)})")
        if ARCHITECTURES[self.architecture] != self.family:
            raise UserError(f"architecture {self.architecture} belongs to family {ARCHITECTURES[self.architecture]}, "
                            f"not {self.family}")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            if int(getattr(self, name)) <= 0:
                raise UserError(f"model config {name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        if self.head_dim is None and self.dim % self.n_heads:
            raise UserError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}; set head_dim")
        if self.family == "llama" and self.dh % 2:
            raise UserError(f"RoPE needs an even head_dim, got {self.dh}")
        if self.family == "gpt2" and (self.n_kv_heads != self.n_heads or self.dh * self.n_heads != self.dim):
            raise UserError("gpt2 needs n_kv_heads == n_heads and head_dim * n_heads == dim")
        if self.rope_type not in ROPE_TYPES:
            raise UserError(f"unsupported rope scaling {self.rope_type!r} (known: {', '.join(ROPE_TYPES)})")
        if self.rope_type != "default" and "factor" not in self.rope_scaling:
            raise UserError(f"rope scaling {self.rope_type!r} needs a 'factor'")
        if self.sliding_window is not None and (self.family != "llama" or self.sliding_window <= 0):
            raise UserError(f"sliding_window needs the llama family and a positive size, got {self.sliding_window}")
        if self.window_from_layer < 0:
            raise UserError(f"window_from_layer must not be negative, got {self.window_from_layer}")
        if self.norm_eps <= 0:
            raise UserError(f"norm_eps must be positive, got {self.norm_eps}")
        return self

    def windowed(self, layer: int) -> bool:
        """Whether block `layer` uses sliding-window attention."""
        return self.sliding_window is not None and layer >= self.window_from_layer

    def n_params(self) -> int:
        """Parameter count of the full model (tied embeddings counted once)."""
        D, F, Dh = self.dim, self.ffn_dim, self.dh
        attn = D * Dh * (self.n_heads * 2 + self.n_kv_heads * 2)
        if self.attn_bias:
            attn += Dh * (self.n_heads + 2 * self.n_kv_heads)
        if self.attn_out_bias:
            attn += D
        n_mlp = 2 if self.family == "gpt2" else 3
        mlp = n_mlp * D * F + ((n_mlp - 1) * F + D if self.mlp_bias else 0)
        norms = (4 if self.family == "gpt2" else 2) * D
        embed = self.vocab_size * D + (self.max_seq_len * D if self.family == "gpt2" else 0)
        head = 0 if self.tie_embeddings else self.vocab_size * D
        final_norm = (2 if self.family == "gpt2" else 1) * D
        return embed + self.n_layers * (attn + mlp + norms) + final_norm + head

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, ModelConfig] = {
    # runs a training step in milliseconds on CPU; vocab_size is replaced by the tokenizer's
    "tiny": ModelConfig(family="llama", architecture="LlamaForCausalLM", vocab_size=4096, dim=64, n_layers=4,
                        n_heads=4, n_kv_heads=2, ffn_dim=176, max_seq_len=256, tie_embeddings=True),
    # about 30M parameters
    "small": ModelConfig(family="llama", architecture="LlamaForCausalLM", vocab_size=8192, dim=512, n_layers=8,
                         n_heads=8, n_kv_heads=4, ffn_dim=1408, max_seq_len=512, tie_embeddings=True),
}
