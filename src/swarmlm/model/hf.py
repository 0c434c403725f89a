"""Checkpoint I/O in the Hugging Face layout: config.json plus safetensors (single or sharded).

Reads and writes GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM and MistralForCausalLM,
so `transformers` loads what we save and we load what it saves. Loading a span of blocks
opens only the files that hold them and reads only their tensors (`safe_open` per tensor),
so a server for blocks 8-15 never touches the rest. Saving is atomic per file (temp file,
then os.replace; config.json last). Knows nothing of tokenization beyond saving one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from swarmlm.errors import CheckpointError, UserError
from swarmlm.model.config import ARCHITECTURES, ModelConfig
from swarmlm.model.transformer import Transformer

MODEL_TYPES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "mistral": "MistralForCausalLM"}
INDEX_FILE = "model.safetensors.index.json"
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


# ---- config.json ------------------------------------------------------------------------------

def load_config(path: str | os.PathLike) -> ModelConfig:
    """Read `path/config.json` into a validated ModelConfig."""
    return config_from_hf(_read_json(_model_dir(path) / "config.json"), source=str(path))


def config_from_hf(d: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
    arch = (d.get("architectures") or [None])[0] or MODEL_TYPES.get(d.get("model_type", ""))
    if d.get("model_type") == "t5":
        raise CheckpointError(f"{source}: T5 (encoder-decoder) checkpoints run with `generate` and `train` only; "
                              "serving, swarm generation and finetuning need a decoder-only model")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{source}: unsupported architecture {arch!r} (supported: {', '.join(ARCHITECTURES)})")

    def need(key: str) -> Any:
        if key not in d:
            raise CheckpointError(f"{source}: config.json has no {key!r}")
        return d[key]

    common = dict(architecture=arch, vocab_size=int(need("vocab_size")),
                  bos_token_id=_first_id(d.get("bos_token_id")), eos_token_id=_first_id(d.get("eos_token_id")))
    if arch == "GPT2LMHeadModel":
        act = d.get("activation_function", "gelu_new")
        if act not in _TANH_GELUS or not d.get("scale_attn_weights", True) or d.get("scale_attn_by_inverse_layer_idx"):
            raise CheckpointError(f"{source}: unsupported GPT-2 variant (activation {act!r}, attention scaling)")
        D, H = int(need("n_embd")), int(need("n_head"))
        cfg = ModelConfig(family="gpt2", dim=D, n_layers=int(need("n_layer")), n_heads=H, n_kv_heads=H,
                          ffn_dim=int(d.get("n_inner") or 4 * D), max_seq_len=int(d.get("n_positions", 1024)),
                          norm_eps=float(d.get("layer_norm_epsilon", 1e-5)),
                          tie_embeddings=bool(d.get("tie_word_embeddings", True)),
                          attn_bias=True, attn_out_bias=True, mlp_bias=True, **common)
    else:
        if d.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{source}: unsupported activation {d.get('hidden_act')!r} (only silu)")
        theta, scaling = _rope_from_hf(d, source)
        max_len = int(d.get("max_position_embeddings", 2048))
        window, window_from = _window_from_hf(d, arch, int(need("num_hidden_layers")), source)
        bias = bool(d.get("attention_bias", False))
        H, D = int(need("num_attention_heads")), int(need("hidden_size"))
        head_dim = d.get("head_dim")
        head_dim = None if head_dim is None or int(head_dim) * H == D else int(head_dim)  # None: the default D // H
        cfg = ModelConfig(family="llama", dim=D, n_layers=int(need("num_hidden_layers")),
                          n_heads=H, n_kv_heads=int(d.get("num_key_value_heads") or H), head_dim=head_dim,
                          ffn_dim=int(need("intermediate_size")), max_seq_len=max_len,
                          norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
                          tie_embeddings=bool(d.get("tie_word_embeddings", False)),
                          attn_bias=True if arch == "Qwen2ForCausalLM" else bias,
                          attn_out_bias=bias if arch == "LlamaForCausalLM" else False,
                          mlp_bias=bool(d.get("mlp_bias", False)) if arch == "LlamaForCausalLM" else False,
                          sliding_window=window, window_from_layer=window_from, **common)
    try:
        return cfg.validate()
    except UserError as e:
        raise CheckpointError(f"{source}: {e}") from None


def _window_from_hf(d: dict[str, Any], arch: str, n_layers: int, source: str) -> tuple[int | None, int]:
    """(sliding window or None, first windowed layer), as transformers reads them: Mistral windows
    every layer when `sliding_window` is set; Qwen2 only with `use_sliding_window`, in layers
    >= `max_window_layers`, or where `layer_types` says "sliding_attention"."""
    window = d.get("sliding_window")
    if arch == "LlamaForCausalLM" or window is None or (arch == "Qwen2ForCausalLM" and not d.get("use_sliding_window")):
        return None, 0
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        raise CheckpointError(f"{source}: sliding_window must be a positive integer, got {window!r}")
    if arch == "MistralForCausalLM":
        return window, 0
    types = d.get("layer_types")
    if types is None:
        return window, min(int(d.get("max_window_layers", 28)), n_layers)
    first = sum(1 for t in types if t == "full_attention")
    expected = ["full_attention"] * first + ["sliding_attention"] * (n_layers - first)
    if list(types) != expected:
        raise CheckpointError(f"{source}: unsupported layer_types (only full attention layers followed by "
                              f"sliding-window layers): {types}")
    return window, first


def _rope_from_hf(d: dict[str, Any], source: str) -> tuple[float, dict | None]:
    """Both layouts: top-level rope_theta + rope_scaling (transformers 4), or rope_parameters (5)."""
    params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    if params and any(isinstance(v, dict) for v in params.values()):
        raise CheckpointError(f"{source}: per-layer-type rope parameters are not supported")
    theta = float(params.pop("rope_theta", None) or d.get("rope_theta") or 10000.0)
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if float(params.pop("partial_rotary_factor", d.get("partial_rotary_factor") or 1.0)) != 1.0:
        raise CheckpointError(f"{source}: partial rotary embeddings are not supported")
    return theta, (None if kind == "default" else {"rope_type": kind, **params})


def _first_id(value: Any) -> int | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return None if value is None else int(value)


def config_to_hf(cfg: ModelConfig, *, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The config.json transformers expects for `cfg.architecture`."""
    dtype_name = str(dtype).removeprefix("torch.")
    base = {"architectures": [cfg.architecture], "vocab_size": cfg.vocab_size, "bos_token_id": cfg.bos_token_id,
            "eos_token_id": cfg.eos_token_id, "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": dtype_name,
            "use_cache": True}
    if cfg.family == "gpt2":
        if not (cfg.attn_bias and cfg.attn_out_bias and cfg.mlp_bias):
            raise UserError("GPT2LMHeadModel checkpoints need attn_bias, attn_out_bias and mlp_bias")
        return {**base, "model_type": "gpt2", "n_embd": cfg.dim, "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
                "n_inner": cfg.ffn_dim, "n_positions": cfg.max_seq_len, "n_ctx": cfg.max_seq_len,
                "layer_norm_epsilon": cfg.norm_eps, "activation_function": "gelu_new", "scale_attn_weights": True,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    model_type = {v: k for k, v in MODEL_TYPES.items()}[cfg.architecture]
    out = {**base, "model_type": model_type, "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim,
           "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
           "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.dh, "max_position_embeddings": cfg.max_seq_len,
           "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling,
           "hidden_act": "silu", "attention_dropout": 0.0}
    biases = (cfg.attn_bias, cfg.attn_out_bias, cfg.mlp_bias)
    if cfg.architecture == "LlamaForCausalLM":
        if cfg.attn_bias != cfg.attn_out_bias:
            raise UserError("LlamaForCausalLM has one attention_bias for q/k/v and o; set attn_out_bias = attn_bias")
        out.update(attention_bias=cfg.attn_bias, mlp_bias=cfg.mlp_bias)
    elif biases != ((True, False, False) if cfg.architecture == "Qwen2ForCausalLM" else (False, False, False)):
        raise UserError(f"{cfg.architecture} does not support biases {biases} (attn, attn_out, mlp)")
    if cfg.architecture == "MistralForCausalLM":
        if cfg.sliding_window is not None and cfg.window_from_layer:
            raise UserError("MistralForCausalLM windows every layer; window_from_layer must be 0")
        out.update(sliding_window=cfg.sliding_window)
    elif cfg.architecture == "Qwen2ForCausalLM":
        windowed = cfg.sliding_window is not None
        out.update(sliding_window=cfg.sliding_window, use_sliding_window=windowed,
                   max_window_layers=cfg.window_from_layer if windowed else cfg.n_layers)
    elif cfg.sliding_window is not None:
        raise UserError("LlamaForCausalLM has no sliding-window attention; use Mistral or Qwen2")
    return out


# ---- tensor names -------------------------------------------------------------------------------

# A source: (HF tensor name, kind, part). GPT-2 stores Conv1D weights as (in, out) ("t": transpose)
# and fuses q/k/v into c_attn ("qkv_w" / "qkv_b": transpose and take third `part`).
Source = tuple[str, str, int]


def _source(cfg: ModelConfig, name: str, gpt2_prefix: str = "transformer.") -> Source:
    """Where our parameter `name` lives in an HF checkpoint of cfg.architecture."""
    parts = name.split(".")
    if cfg.family == "llama":
        if parts[0] == "layers":
            i, group, rest = parts[1], parts[2], ".".join(parts[3:])
            sub = {"attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                   "attention": "self_attn", "feed_forward": "mlp"}[group]
            return f"model.layers.{i}.{sub}.{rest}", "keep", 0
        if name == "output.weight":
            return ("model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"), "keep", 0
        return {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}[name], "keep", 0
    p = gpt2_prefix
    if parts[0] == "layers":
        i, group, proj, kind = parts[1], parts[2], parts[3], parts[-1]
        if group in ("attention_norm", "ffn_norm"):
            return f"{p}h.{i}.{'ln_1' if group == 'attention_norm' else 'ln_2'}.{kind}", "keep", 0
        if proj in ("q_proj", "k_proj", "v_proj"):
            return f"{p}h.{i}.attn.c_attn.{kind}", ("qkv_w" if kind == "weight" else "qkv_b"), "qkv".index(proj[0])
        hf = {"o_proj": "attn.c_proj", "up_proj": "mlp.c_fc", "down_proj": "mlp.c_proj"}[proj]
        return f"{p}h.{i}.{hf}.{kind}", ("t" if kind == "weight" else "keep"), 0
    if name == "output.weight":
        return (f"{p}wte.weight" if cfg.tie_embeddings else "lm_head.weight"), "keep", 0
    return {"tok_embeddings.weight": f"{p}wte.weight", "pos_embeddings.weight": f"{p}wpe.weight",
            "norm.weight": f"{p}ln_f.weight", "norm.bias": f"{p}ln_f.bias"}[name], "keep", 0


def _convert(t: torch.Tensor, kind: str, part: int) -> torch.Tensor:
    """An HF tensor -> ours."""
    if kind == "t":
        return t.t()
    if kind == "qkv_w":
        return t.t().chunk(3, 0)[part]  # c_attn (D, 3D) -> (3D, D) -> one of q, k, v
    if kind == "qkv_b":
        return t.chunk(3, 0)[part]
    return t


def to_hf_state_dict(cfg: ModelConfig, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names -> HF names (the inverse of `_convert`); a tied head is left out, as HF expects."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, list[torch.Tensor | None]] = {}
    for name, t in state.items():
        if name == "output.weight" and cfg.tie_embeddings:
            continue
        hf, kind, part = _source(cfg, name)
        if kind == "t":
            out[hf] = t.t()
        elif kind in ("qkv_w", "qkv_b"):
            fused.setdefault(hf, [None, None, None])[part] = t
        else:
            out[hf] = t
    for hf, (q, k, v) in fused.items():
        qkv = torch.cat([q, k, v], 0)  # (3D, D) or (3D,)
        out[hf] = qkv.t() if hf.endswith(".weight") else qkv  # Conv1D: (D, 3D)
    return {k: v.detach().contiguous() for k, v in out.items()}


# ---- loading -------------------------------------------------------------------------------------

def load_model(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, layers: range | None = None,
               with_embed: bool = True, with_head: bool = True,
               device: torch.device | str = "cpu") -> tuple[Transformer, ModelConfig]:
    """Build the requested parts of the model in `path` and fill them from disk, reading only their tensors."""
    directory = _model_dir(path)
    cfg = load_config(directory)
    with torch.device("meta"):
        model = Transformer(cfg, layers=layers, with_embed=with_embed, with_head=with_head)
    wanted = list(model.state_dict())
    weight_map = _weight_map(directory)
    prefix = "transformer." if any(k.startswith("transformer.") for k in weight_map) else ""
    sources = {name: _source(cfg, name, prefix) for name in wanted}
    by_file: dict[str, list[str]] = {}
    for name, (hf, _, _) in sources.items():
        if hf not in weight_map:
            raise CheckpointError(f"{directory}: tensor {hf!r} is missing from the checkpoint")
        by_file.setdefault(weight_map[hf], []).append(name)
    expected = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        read: dict[str, torch.Tensor] = {}  # each HF tensor is read once even if several of ours slice it
        try:
            with safe_open(str(directory / file), framework="pt", device="cpu") as handle:
                for name in names:
                    hf, kind, part = sources[name]
                    if hf not in read:
                        read[hf] = handle.get_tensor(hf)
                    state[name] = _checked(_convert(read[hf], kind, part), expected[name].shape, hf, directory)
                    state[name] = state[name].to(dtype)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
            raise CheckpointError(f"{directory / file}: cannot read safetensors ({e})") from None
    model.load_state_dict({k: v.to(device).contiguous() for k, v in state.items()}, assign=True)
    model.tie_weights()
    return model.eval(), cfg


def _checked(t: torch.Tensor, shape: torch.Size, hf: str, directory: Path) -> torch.Tensor:
    if t.shape != shape:
        raise CheckpointError(f"{directory}: tensor {hf!r} has shape {tuple(t.shape)}, config.json implies "
                              f"{tuple(shape)}")
    return t


def _weight_map(directory: Path) -> dict[str, str]:
    """HF tensor name -> file holding it, from the index or from the single file's header."""
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no weight_map")
        for file in set(weight_map.values()):
            if not (directory / file).is_file():
                raise CheckpointError(f"{directory}: shard {file} listed in {INDEX_FILE} is missing")
        return weight_map
    single = directory / "model.safetensors"
    if not single.is_file():
        other = "pytorch_model.bin" if (directory / "pytorch_model.bin").exists() else None
        raise CheckpointError(f"{directory}: no model.safetensors or {INDEX_FILE}"
                              + (" (only safetensors weights are supported, found pytorch_model.bin)" if other else ""))
    try:
        with safe_open(str(single), framework="pt", device="cpu") as handle:
            return {k: single.name for k in handle.keys()}
    except Exception as e:
        raise CheckpointError(f"{single}: cannot read safetensors ({e})") from None


def _model_dir(path: str | os.PathLike) -> Path:
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"no model directory at {directory}")
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory} has no config.json")
    return directory


def _read_json(file: Path) -> dict[str, Any]:
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return value


# ---- saving ----------------------------------------------------------------------------------------

def save_model(model: Transformer | Mapping[str, torch.Tensor], cfg: ModelConfig, path: str | os.PathLike, *,
               tokenizer: Any = None, max_shard_bytes: int = 2 << 30) -> None:
    """Write config.json and safetensors (sharded above max_shard_bytes) that `transformers` loads.

    `model` may also be a full state dict in our names (e.g. gathered from FSDP shards).
    """
    state = model.state_dict() if isinstance(model, torch.nn.Module) else dict(model)
    missing = [n for n in _param_names(cfg) if n not in state]
    if missing:
        raise UserError(f"save_model needs the whole model; missing {missing[0]} and {len(missing) - 1} more")
    hf_state = to_hf_state_dict(cfg, state)
    write_checkpoint(path, hf_state, config_to_hf(cfg, dtype=next(iter(hf_state.values())).dtype),
                     tokenizer=tokenizer, max_shard_bytes=max_shard_bytes)


def write_checkpoint(path: str | os.PathLike, hf_state: Mapping[str, torch.Tensor], config: dict, *,
                     tokenizer: Any = None, max_shard_bytes: int = 2 << 30) -> None:
    """A checkpoint directory in transformers' layout: `hf_state` (transformers' names) as
    safetensors, sharded above `max_shard_bytes` with an index, each file written atomically,
    shards of an earlier save with another layout removed; then the tokenizer and config.json
    (last, so a directory with a config.json is whole)."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    shards = _plan_shards(hf_state, max_shard_bytes)
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    tmp = f".tmp{os.getpid()}"
    for name, shard in zip(names, shards):
        save_file(shard, str(directory / (name + tmp)), metadata={"format": "pt"})
    for name in names:
        os.replace(directory / (name + tmp), directory / name)
    index = directory / INDEX_FILE
    if len(shards) > 1:
        weight_map = {k: n for n, shard in zip(names, shards) for k in shard}
        total = sum(t.numel() * t.element_size() for t in hf_state.values())
        _write_text(index, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    elif index.exists():
        index.unlink()
    for stale in directory.glob("model*.safetensors"):
        if stale.name not in names:
            stale.unlink()  # shards of an earlier save with a different layout
    if tokenizer is not None:
        tokenizer.save(directory)
    _write_text(directory / "config.json", json.dumps(config, indent=2))


def _param_names(cfg: ModelConfig) -> list[str]:
    """Every parameter name of the full model for `cfg` (built on the meta device: no memory)."""
    with torch.device("meta"):
        return list(Transformer(cfg).state_dict())


def _plan_shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += n
    return shards


def _write_text(file: Path, text: str) -> None:
    tmp = file.with_name(f".{file.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, file)
