"""Checkpoints written by transformers load into swarmlm with the same numbers, and back."""

from __future__ import annotations

import json

import pytest
import torch

from swarmlm.errors import CheckpointError
from swarmlm.model import hf
from swarmlm.model.cache import KVCache
from swarmlm.model.generate import generate
from tests.model.hf_models import VARIANTS, VOCAB, build_hf, rewrite_config

transformers = pytest.importorskip("transformers")


def _ids(B=2, T=24, seed=3):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.no_grad()
def test_logits_match_transformers(tmp_path, variant):
    ref = build_hf(tmp_path, variant)
    model, cfg = hf.load_model(tmp_path)
    x = _ids()
    torch.testing.assert_close(model(x), ref(x).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ["gpt2", "llama3", "qwen2", "llama_dynamic"])
@torch.no_grad()
def test_greedy_tokens_match_transformers_generate(tmp_path, variant):
    ref = build_hf(tmp_path, variant)
    model, _ = hf.load_model(tmp_path)
    prompt = _ids(1, 8)[0].tolist()
    expected = ref.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[0, 8:].tolist()
    assert generate(model, prompt, max_new_tokens=32) == expected


@pytest.mark.parametrize("variant", ["gpt2", "llama3"])
@torch.no_grad()
def test_kv_cache_decoding_equals_full_recomputation(tmp_path, variant):
    build_hf(tmp_path, variant)
    model, cfg = hf.load_model(tmp_path)
    x = _ids(2, 20)
    cache = KVCache.empty(cfg, batch=2, max_len=20)
    steps = [model(x[:, :12], cache=cache)[:, -1]] + [model(x[:, t:t + 1], cache=cache)[:, -1] for t in range(12, 20)]
    full = model(x)[:, 11:]
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_old_rope_layout_reads_like_rope_parameters(tmp_path):
    build_hf(tmp_path, "llama3")
    params = json.loads((tmp_path / "config.json").read_text())["rope_parameters"]
    del params["rope_theta"]
    rewrite_config(tmp_path, rope_parameters=None, rope_theta=5000.0, rope_scaling=params)
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    model, cfg = hf.load_model(tmp_path)
    assert cfg.rope_theta == 5000.0 and cfg.rope_scaling["rope_type"] == "llama3"
    x = _ids()
    torch.testing.assert_close(model(x), ref(x).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ["gpt2", "llama3", "qwen2"])
@torch.no_grad()
def test_saved_checkpoint_loads_in_transformers(tmp_path, variant):
    build_hf(tmp_path / "src", variant)
    model, cfg = hf.load_model(tmp_path / "src")
    hf.save_model(model, cfg, tmp_path / "out", max_shard_bytes=200_000)  # forces shards
    assert (tmp_path / "out" / hf.INDEX_FILE).is_file()
    ref = getattr(transformers, cfg.architecture).from_pretrained(tmp_path / "out").eval()
    x = _ids()
    torch.testing.assert_close(ref(x).logits, model(x), atol=1e-4, rtol=1e-4)
    again, cfg2 = hf.load_model(tmp_path / "out")
    assert cfg2 == cfg
    torch.testing.assert_close(again(x), model(x))


def test_loading_a_span_reads_only_its_tensors(tmp_path, monkeypatch):
    build_hf(tmp_path / "src", "llama3", num_hidden_layers=6)
    model, cfg = hf.load_model(tmp_path / "src")
    hf.save_model(model, cfg, tmp_path / "ckpt", max_shard_bytes=60_000)
    opened, read = [], []
    real_open = hf.safe_open

    class CountingHandle:
        def __init__(self, inner):
            self.inner = inner

        def __enter__(self):
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, name):
            read.append(name)
            return self.inner.get_tensor(name)

    def counting_open(file, **kw):
        opened.append(file)
        return CountingHandle(real_open(file, **kw))

    monkeypatch.setattr(hf, "safe_open", counting_open)
    span, _ = hf.load_model(tmp_path / "ckpt", layers=range(2, 4), with_embed=False, with_head=False)
    assert list(span.layers) == ["2", "3"]
    assert read and all(n.startswith(("model.layers.2.", "model.layers.3.")) for n in read)
    assert len(read) == len(set(read)) == len(span.state_dict())
    index = json.loads((tmp_path / "ckpt" / hf.INDEX_FILE).read_text())["weight_map"]
    assert len(set(opened)) < len(set(index.values()))  # shards without blocks 2-3 were never opened
    full = model.run_blocks(model.embed(_ids()), start=2, end=4)
    torch.testing.assert_close(span(model.embed(_ids())), full)


def test_bfloat16_load(tmp_path):
    build_hf(tmp_path, "qwen2")
    model, _ = hf.load_model(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model(_ids()).dtype == torch.bfloat16


# ---- bad checkpoints -------------------------------------------------------------------------

def test_missing_directory_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="no model directory"):
        hf.load_model(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        hf.load_model(tmp_path)


def test_missing_weights(tmp_path):
    build_hf(tmp_path, "mistral")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        hf.load_model(tmp_path)


def test_truncated_safetensors(tmp_path):
    build_hf(tmp_path, "mistral")
    file = tmp_path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="cannot read safetensors"):
        hf.load_model(tmp_path)


def test_unknown_architecture(tmp_path):
    build_hf(tmp_path, "mistral")
    rewrite_config(tmp_path, architectures=["BertForMaskedLM"], model_type="bert")
    with pytest.raises(CheckpointError, match="unsupported architecture 'BertForMaskedLM'"):
        hf.load_model(tmp_path)


def test_config_that_disagrees_with_tensors(tmp_path):
    build_hf(tmp_path, "mistral")
    rewrite_config(tmp_path, intermediate_size=100)
    with pytest.raises(CheckpointError, match=r"has shape \(96, 64\), config.json implies \(100, 64\)"):
        hf.load_model(tmp_path)


def test_missing_tensor(tmp_path):
    build_hf(tmp_path, "mistral")
    rewrite_config(tmp_path, num_hidden_layers=3)
    with pytest.raises(CheckpointError, match="model.layers.2.* is missing"):
        hf.load_model(tmp_path)
