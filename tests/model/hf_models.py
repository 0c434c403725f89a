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
