"""T5 checkpoint I/O in the Hugging Face layout (`T5ForConditionalGeneration`, safetensors).

Reads what transformers 4 and 5 write and writes what both read:
- v1.0 (ReLU, head tied to the embedding, decoder output scaled by d_model^-0.5) and v1.1 /
  Flan (gated GELU, untied head, no scaling). transformers 5 marks every T5 config
  `tie_word_embeddings: true` and keeps the scaling in `scale_decoder_outputs`; an
  `lm_head.weight` in the files means an untied head either way, as transformers decides.
- the relative-position tables live in block 0 of each stack (`relative_attention_bias`).
Files are written atomically, config.json last. Knows nothing of tokenizers beyond saving one.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import safe_open

from swarmlm.errors import CheckpointError, UserError
from swarmlm.model.hf import _model_dir, _read_json, _weight_map, write_checkpoint
from swarmlm.model.t5 import ACTIVATIONS, T5, T5Config

ARCHITECTURE = "T5ForConditionalGeneration"
_EMBED_NAMES = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def is_t5(path: str | os.PathLike) -> bool:
    """Whether the checkpoint directory's config.json names the T5 family (model_type "t5")."""
    d = _read_json(_model_dir(path) / "config.json")
    return d.get("model_type") == "t5" or ARCHITECTURE in (d.get("architectures") or [])


# ---- config.json ---------------------------------------------------------------------------------

def load_t5_config(path: str | os.PathLike) -> T5Config:
    directory = _model_dir(path)
    return t5_config_from_hf(_read_json(directory / "config.json"), has_lm_head="lm_head.weight" in _weight_map(directory),
                             source=str(path))


def t5_config_from_hf(d: dict[str, Any], *, has_lm_head: bool, source: str = "config.json") -> T5Config:
    arch = (d.get("architectures") or [ARCHITECTURE])[0]
    if d.get("model_type", "t5") != "t5" or arch != ARCHITECTURE:
        raise CheckpointError(f"{source}: unsupported T5 variant {d.get('model_type')!r} / {arch!r} "
                              f"(only model_type t5 with {ARCHITECTURE})")

    def need(key: str) -> Any:
        if key not in d:
            raise CheckpointError(f"{source}: config.json has no {key!r}")
        return d[key]

    proj = str(d.get("feed_forward_proj", "relu"))
    parts = proj.split("-")
    gated = len(parts) == 2 and parts[0] == "gated"
    act = "gelu_new" if proj == "gated-gelu" else parts[-1]
    if len(parts) > 2 or (len(parts) == 2 and not gated) or act not in ACTIVATIONS:
        raise CheckpointError(f"{source}: unsupported feed_forward_proj {proj!r} "
                              f"(supported: relu, gated-gelu, gelu, silu and their gated- forms)")
    tie_flag = bool(d.get("tie_word_embeddings", True))
    scale = bool(d.get("scale_decoder_outputs", tie_flag))
    if not tie_flag and not has_lm_head:
        raise CheckpointError(f"{source}: tie_word_embeddings is false but the checkpoint has no lm_head.weight")
    pad = int(d.get("pad_token_id", 0) if d.get("pad_token_id") is not None else 0)
    eos = d.get("eos_token_id", 1)
    eos = int(eos[0] if isinstance(eos, list) else eos if eos is not None else 1)
    start = d.get("decoder_start_token_id")
    n_layers = int(need("num_layers"))
    try:
        return T5Config(vocab_size=int(need("vocab_size")), dim=int(need("d_model")), n_heads=int(need("num_heads")),
                        head_dim=int(need("d_kv")), ffn_dim=int(need("d_ff")), n_layers=n_layers,
                        n_decoder_layers=int(d.get("num_decoder_layers") or n_layers),
                        n_buckets=int(d.get("relative_attention_num_buckets", 32)),
                        max_distance=int(d.get("relative_attention_max_distance", 128)),
                        activation=act, gated=gated, norm_eps=float(d.get("layer_norm_epsilon", 1e-6)),
                        tie_embeddings=not has_lm_head, scale_head=scale,
                        max_seq_len=int(d.get("n_positions") or 512), pad_token_id=pad, eos_token_id=eos,
                        decoder_start_token_id=pad if start is None else int(start),
                        n_sentinels=int(d.get("swarmlm_n_sentinels", 0))).validate()
    except UserError as e:
        raise CheckpointError(f"{source}: {e}") from None


def t5_config_to_hf(cfg: T5Config, *, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """config.json for transformers 4 (scaling follows tie_word_embeddings) and 5 (scale_decoder_outputs)."""
    if cfg.tie_embeddings != cfg.scale_head:
        raise UserError("transformers 4 scales the head exactly when it is tied; "
                        "save T5 with tie_embeddings == scale_head")
    proj = ("gated-" if cfg.gated else "") + ("gelu" if cfg.activation == "gelu_new" and cfg.gated else cfg.activation)
    if cfg.activation == "gelu_new" and not cfg.gated:
        raise UserError("transformers has no ungated gelu_new T5; use activation 'gelu' or gated")
    if cfg.activation == "gelu" and cfg.gated:
        raise UserError("transformers' gated-gelu T5 uses the tanh GELU; use activation 'gelu_new'")
    return {"architectures": [ARCHITECTURE], "model_type": "t5", "vocab_size": cfg.vocab_size, "d_model": cfg.dim,
            "d_kv": cfg.head_dim, "d_ff": cfg.ffn_dim, "num_layers": cfg.n_layers,
            "num_decoder_layers": cfg.n_decoder_layers, "num_heads": cfg.n_heads,
            "relative_attention_num_buckets": cfg.n_buckets, "relative_attention_max_distance": cfg.max_distance,
            "dropout_rate": 0.0, "layer_norm_epsilon": cfg.norm_eps, "initializer_factor": 1.0,
            "feed_forward_proj": proj, "is_encoder_decoder": True, "use_cache": True,
            "tie_word_embeddings": cfg.tie_embeddings, "scale_decoder_outputs": cfg.scale_head,
            "pad_token_id": cfg.pad_token_id, "eos_token_id": cfg.eos_token_id,
            "decoder_start_token_id": cfg.decoder_start_token_id, "n_positions": cfg.max_seq_len,
            "swarmlm_n_sentinels": cfg.n_sentinels, "torch_dtype": str(dtype).removeprefix("torch.")}


# ---- tensor names ------------------------------------------------------------------------------

_STACK = re.compile(r"(encoder|decoder)\.(\d+)\.(\w+)\.(?:(\w+)\.)?weight")
_SUBLAYER = {("encoder", "attn"): "0.SelfAttention", ("encoder", "ff"): "1.DenseReluDense",
             ("decoder", "attn"): "0.SelfAttention", ("decoder", "cross"): "1.EncDecAttention",
             ("decoder", "ff"): "2.DenseReluDense"}
_NORM = {("encoder", "attn_norm"): 0, ("encoder", "ff_norm"): 1,
         ("decoder", "attn_norm"): 0, ("decoder", "cross_norm"): 1, ("decoder", "ff_norm"): 2}


def hf_name(name: str) -> str:
    """Our parameter name -> the HF tensor name."""
    fixed = {"embed.weight": "shared.weight", "lm_head.weight": "lm_head.weight",
             "encoder_norm.weight": "encoder.final_layer_norm.weight",
             "decoder_norm.weight": "decoder.final_layer_norm.weight",
             "encoder_bias.weight": "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
             "decoder_bias.weight": "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"}
    if name in fixed:
        return fixed[name]
    m = _STACK.fullmatch(name)
    assert m is not None, name
    stack, i, part, proj = m.groups()
    if proj is None:
        return f"{stack}.block.{i}.layer.{_NORM[stack, part]}.layer_norm.weight"
    return f"{stack}.block.{i}.layer.{_SUBLAYER[stack, part]}.{proj}.weight"


# ---- loading and saving ---------------------------------------------------------------------------

def load_t5(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
            device: torch.device | str = "cpu") -> tuple[T5, T5Config]:
    directory = _model_dir(path)
    weight_map = _weight_map(directory)
    cfg = t5_config_from_hf(_read_json(directory / "config.json"), has_lm_head="lm_head.weight" in weight_map,
                            source=str(path))
    with torch.device("meta"):
        model = T5(cfg)
    expected = model.state_dict()
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight", None)
    sources: dict[str, str] = {}
    for name in expected:
        hf = hf_name(name)
        if name == "embed.weight":
            hf = next((n for n in _EMBED_NAMES if n in weight_map), hf)
        if hf not in weight_map:
            raise CheckpointError(f"{directory}: tensor {hf!r} is missing from the checkpoint")
        sources[name] = hf
    by_file: dict[str, list[str]] = {}
    for name, hf in sources.items():
        by_file.setdefault(weight_map[hf], []).append(name)
    state: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        try:
            with safe_open(str(directory / file), framework="pt", device="cpu") as handle:
                for name in names:
                    t = handle.get_tensor(sources[name])
                    if t.shape != expected[name].shape:
                        raise CheckpointError(f"{directory}: tensor {sources[name]!r} has shape {tuple(t.shape)}, "
                                              f"config.json implies {tuple(expected[name].shape)}")
                    state[name] = t.to(dtype)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
            raise CheckpointError(f"{directory / file}: cannot read safetensors ({e})") from None
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    model.load_state_dict({k: v.to(device).contiguous() for k, v in state.items()}, assign=True)
    model.tie_weights()
    return model.eval(), cfg


def save_t5(model: T5 | Mapping[str, torch.Tensor], cfg: T5Config, path: str | os.PathLike, *,
            tokenizer=None, max_shard_bytes: int = 2 << 30) -> None:
    """Write config.json and safetensors (sharded above max_shard_bytes) that transformers loads."""
    state = model.state_dict() if isinstance(model, torch.nn.Module) else dict(model)
    hf_state = {hf_name(k): v.detach().contiguous() for k, v in state.items()
                if not (k == "lm_head.weight" and cfg.tie_embeddings)}
    write_checkpoint(path, hf_state, t5_config_to_hf(cfg, dtype=next(iter(hf_state.values())).dtype),
                     tokenizer=tokenizer, max_shard_bytes=max_shard_bytes)
