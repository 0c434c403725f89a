"""A block, and whole private generation, against the plaintext model of model/ (GPT-2 and Llama
layouts), including the edges of the approximations: large attention scores, tiny variances."""

from __future__ import annotations

import pytest
import torch

from swarmlm.model import hf
from swarmlm.model.config import ModelConfig
from swarmlm.model.generate import generate
from swarmlm.model.transformer import Transformer
from swarmlm.privacy.mpc.client import generate_in_process
from swarmlm.privacy.mpc.model import KVShares, PublicWeights, block
from swarmlm.privacy.mpc.ring import decode, encode
from swarmlm.privacy.mpc.runtime import LocalParties
from swarmlm.privacy.mpc.shares import combine, split
from tests.model.hf_models import build_hf
from tests.privacy.decisive import decisive

CONFIGS = {
    "gpt2": ModelConfig(family="gpt2", architecture="GPT2LMHeadModel", vocab_size=64, dim=64, n_layers=1, n_heads=4,
                        n_kv_heads=4, ffn_dim=256, max_seq_len=64, attn_bias=True, attn_out_bias=True, mlp_bias=True),
    "llama": ModelConfig(family="llama", architecture="LlamaForCausalLM", vocab_size=64, dim=64, n_layers=1,
                         n_heads=4, n_kv_heads=2, ffn_dim=176, max_seq_len=64),
}


def _model(family: str, *, q_gain: float = 1.0) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(CONFIGS[family]).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                prm.add_(0.1 * torch.randn(prm.shape, generator=g))
            elif "proj" in name:
                prm.mul_(5.0)                      # activations of order one, as in a trained model
        model.layers["0"].attention.q_proj.weight.mul_(q_gain)
    return model


def _plain_block(model: Transformer, h: torch.Tensor) -> torch.Tensor:
    T = h.shape[1]
    rope = model.rotary.tables(torch.arange(T)[None], h.dtype) if model.rotary is not None else None
    with torch.no_grad():
        return model.layers["0"](h, rope=rope, is_causal=True)


def _private_block(model: Transformer, h: torch.Tensor, parties: LocalParties) -> torch.Tensor:
    w = PublicWeights.from_model(model)
    shares = split(encode(h))
    caches = [KVShares() for _ in range(3)]
    out = parties.run(lambda p: block(p, w, 0, shares[p.index], caches[p.index], torch.arange(h.shape[1])))
    return decode(combine([o.a for o in out])).float()


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


@pytest.fixture(scope="module")
def parties():
    return LocalParties(timeout_s=30)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("scale", [0.3, 1.0, 8.0])
def test_block_matches_plaintext_over_input_scales(parties, family, scale):
    model = _model(family)
    h = torch.randn(1, 12, 64, generator=torch.Generator().manual_seed(2)) * scale
    assert _rel_err(_private_block(model, h, parties), _plain_block(model, h)) < 1e-2


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_block_with_large_attention_scores(parties, family):
    model = _model(family, q_gain=20.0)              # scores spread over tens: softmax is nearly one-hot
    h = torch.randn(1, 12, 64, generator=torch.Generator().manual_seed(3))
    ref = _plain_block(model, h)
    att = model.layers["0"].attention
    with torch.no_grad():
        n = model.layers["0"].attention_norm(h)
        q, k = att.q_proj(n)[0, :, :16], att.k_proj(n)[0, :, :16]      # head 0
    assert float((q @ k.T).abs().max()) / 4 > 30
    assert _rel_err(_private_block(model, h, parties), ref) < 1e-2


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_block_with_tiny_variance(parties, family):
    model = _model(family)
    g = torch.Generator().manual_seed(4)
    h = 0.02 * torch.randn(1, 12, 64, generator=g) + (3.0 if family == "gpt2" else 0.0)   # LayerNorm: big mean
    assert _rel_err(_private_block(model, h, parties), _plain_block(model, h)) < 1e-2


@pytest.mark.parametrize("variant", ["gpt2", "llama3", "mistral"])
def test_private_greedy_generation_equals_local(tmp_path, variant):
    pytest.importorskip("transformers")
    build_hf(tmp_path, variant)
    model, _ = hf.load_model(tmp_path)
    g = torch.Generator().manual_seed(0)
    candidates = [[5, 17, 200, 3, 99, 42, 7]] + [torch.randint(0, model.cfg.vocab_size, (7,), generator=g).tolist()
                                                 for _ in range(40)]
    prompt = decisive(model, candidates, 16)
    tokens, stats = generate_in_process(model, prompt, max_new_tokens=16)
    assert tokens == generate(model, prompt, max_new_tokens=16)
    assert stats.rounds > 0 and stats.bytes > 0


def test_private_sampling_follows_the_seed(tmp_path):
    pytest.importorskip("transformers")
    build_hf(tmp_path, "llama3")
    model, _ = hf.load_model(tmp_path)
    a, _ = generate_in_process(model, [1, 2, 3], max_new_tokens=4, temperature=1.0, seed=7)
    b, _ = generate_in_process(model, [1, 2, 3], max_new_tokens=4, temperature=1.0, seed=7)
    assert a == b == generate(model, [1, 2, 3], max_new_tokens=4, temperature=1.0, seed=7)


def test_gated_mlp_truncates_once_after_the_down_projection(parties):
    model = _model("llama")
    h = torch.randn(1, 12, 64, generator=torch.Generator().manual_seed(5))
    for party in parties.parties:
        party.by_tag.clear()
    _private_block(model, h, parties)
    rounds, sent = parties.parties[0].by_tag["gate*up+down"]
    assert rounds == 1 and "gate*up" not in parties.parties[0].by_tag
    assert sum(party.by_tag["gate*up+down"][1] for party in parties.parties) == 4 * 8 * 12 * 64   # D outputs, not FF


def test_a_prompts_scores_are_truncated_only_where_the_causal_mask_lets_a_query_see(parties):
    model = _model("llama")
    h = torch.randn(1, 12, 64, generator=torch.Generator().manual_seed(6))
    for party in parties.parties:
        party.by_tag.clear()
    got = _private_block(model, h, parties)
    assert sum(party.by_tag["qk"][1] for party in parties.parties) == 4 * 8 * 4 * (12 * 13 // 2)   # 4 heads
    assert _rel_err(got, _plain_block(model, h)) < 1e-2
