"""Tiny random transformers checkpoints for the model tests (transformers is a test-only dependency)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 320
LLAMA_BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, bos_token_id=None, eos_token_id=None,
                  pad_token_id=None)
VARIANTS = {
    "gpt2": ("GPT2LMHeadModel", dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                     bos_token_id=None, eos_token_id=None)),
    "llama3": ("LlamaForCausalLM", dict(LLAMA_BASE, head_dim=32, num_attention_heads=2, num_key_value_heads=1,
                                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "llama_linear": ("LlamaForCausalLM", dict(LLAMA_BASE, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama_dynamic": ("LlamaForCausalLM", dict(LLAMA_BASE, max_position_embeddings=16,
                                               rope_scaling={"rope_type": "dynamic", "factor": 4.0})),
    "qwen2": ("Qwen2ForCausalLM", dict(LLAMA_BASE, tie_word_embeddings=True)),
    "mistral": ("MistralForCausalLM", dict(LLAMA_BASE, sliding_window=None)),
}


def build_hf(directory: Path, variant: str, *, seed: int = 0, **overrides):
    """Save a random transformers model of `variant` into `directory`; return it (eval mode)."""
    import transformers

    arch, kwargs = VARIANTS[variant]
    kwargs = {**kwargs, **overrides}
    cls = getattr(transformers, arch)
    config_cls = cls.config_class
    torch.manual_seed(seed)
    model = cls(config_cls(**kwargs)).eval()
    _randomize_norms(model)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    model.save_pretrained(directory)
    return model


def _randomize_norms(model) -> None:
    # norms start at exactly 1 / 0 and biases at 0; perturb them so a mix-up of names shows in the logits
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def rewrite_config(directory: Path, **changes) -> None:
    """Edit config.json in place (None deletes a key)."""
    file = directory / "config.json"
    config = json.loads(file.read_text())
    for k, v in changes.items():
        if v is None:
            config.pop(k, None)
        else:
            config[k] = v
    file.write_text(json.dumps(config))


T5_VARIANTS = {  # tiny T5s: v1.0 (ReLU, tied, scaled head) and v1.1 (gated GELU, untied); few buckets and a short
    # max_distance so the log-spaced buckets are exercised by short sequences
    "v1.0": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    "v1.1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}
T5_BASE = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
               relative_attention_num_buckets=8, relative_attention_max_distance=12, dropout_rate=0.0,
               pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def build_t5(directory: Path, variant: str, *, seed: int = 0, **overrides):
    """Save a random transformers T5ForConditionalGeneration; return it as transformers reloads it (eval mode).

    transformers 5 builds every T5 with its head tied to the embedding; v1.1 gets its own head here."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.T5Config(**{**T5_BASE, **T5_VARIANTS[variant], **overrides})
    model = transformers.T5ForConditionalGeneration(config).eval()
    if not T5_VARIANTS[variant]["tie_word_embeddings"]:
        model.lm_head.weight = torch.nn.Parameter(torch.randn(config.vocab_size, config.d_model))
    _randomize_norms(model)
    model.save_pretrained(directory)
    return transformers.T5ForConditionalGeneration.from_pretrained(directory).eval()
