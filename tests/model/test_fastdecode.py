"""The lean decode step computes exactly what run_blocks computes (float and quantized weights)."""

from __future__ import annotations

import pytest
import torch

from swarmlm.model import generate as gen
from swarmlm.model import qkernels
from swarmlm.model.cache import KVCache
from swarmlm.model.config import PRESETS
from swarmlm.model.fastdecode import DecodeStep, fused_projections
from swarmlm.model.quant import quantize_model
from swarmlm.model.transformer import Transformer

TINY = PRESETS["tiny"].replace(vocab_size=300, n_layers=2, max_seq_len=64)
WIDE = TINY.replace(dim=128, n_heads=2, n_kv_heads=1, ffn_dim=192)
GPT2 = TINY.replace(family="gpt2", architecture="GPT2LMHeadModel", n_kv_heads=4, attn_bias=True, attn_out_bias=True,
                    mlp_bias=True, tie_embeddings=False)
PROMPTS = [[[1, 2, 3, 4]], [[1, 2, 3], [4, 5, 6]], [[1, 2, 3, 4, 5], [9]]]


def _logits(model, prompts, *, fast: bool, monkeypatch, n: int = 10) -> torch.Tensor:
    monkeypatch.setattr(gen.DecodeStep, "supports", staticmethod(lambda m: fast))
    cache = KVCache.empty(model.cfg, len(prompts), 40)
    step = gen.local_step(model, cache)
    ids, key_mask = gen.left_pad(prompts)
    out = [step(ids, key_mask)]
    for _ in range(n):
        out.append(step(out[-1].argmax(-1)[:, None], None))
    return torch.stack(out)


@pytest.mark.parametrize("cfg", [TINY, WIDE, GPT2], ids=["llama", "llama-wide", "gpt2"])
@pytest.mark.parametrize("scheme", ["none", "int8", "int4"])
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
def test_fast_step_equals_run_blocks_exactly(cfg, scheme, compiled, monkeypatch):
    """With the compiled step (csrc/decode.cpp, one row) where the extension builds, and with the
    Python loop (its fallback) everywhere."""
    if compiled and qkernels.extension() is None:
        pytest.skip(f"no compiled kernels here: {qkernels.describe()}")
    if not compiled:
        monkeypatch.setattr(DecodeStep, "_compile", lambda self: None)
    torch.manual_seed(0)
    model = quantize_model(Transformer(cfg).eval(), scheme)
    if compiled:    # WIDE's blocks of one row take the compiled step (gpt2's LayerNorms never do, nor
        step = DecodeStep(model, KVCache.empty(model.cfg, 1, 8))      # TINY's padded int4 down_proj)
        assert (step.plan is not None) == (cfg is WIDE or (cfg is TINY and scheme != "int4"))
        assert step.plan_head == (step.plan is not None and scheme == "none")    # 300 rows: a padded int8 head
    for prompts in PROMPTS:
        slow = _logits(model, prompts, fast=False, monkeypatch=monkeypatch)
        fast = _logits(model, prompts, fast=True, monkeypatch=monkeypatch)
        assert torch.equal(fast, slow)


def test_fusion_adds_no_weights_and_follows_training():
    torch.manual_seed(0)
    model = Transformer(WIDE)
    before = sum(p.numel() for p in model.parameters())
    fused = fused_projections(model)
    qkv, gate_up = fused[0]
    q = model.layers["0"].attention.q_proj
    assert qkv[1] == [128, 64, 64] and gate_up[1] == [192, 192]
    assert q.weight.untyped_storage().data_ptr() == qkv[0].weight.untyped_storage().data_ptr()
    assert sum(p.numel() for p in model.parameters()) == before
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    opt.step()                                    # updates the parts in place: the fused weights follow
    assert torch.equal(qkv[0].weight[:128], q.weight)
    assert fused_projections(model) is fused
    model.double()                                # new storage: the fused weights are rebuilt
    assert fused_projections(model) is not fused


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_fusion_needs_rows_in_blocks_of_16(scheme):
    torch.manual_seed(0)
    odd = TINY.replace(dim=48, n_heads=4, n_kv_heads=2)      # k/v of 24 rows: padded to 32 in the layout
    assert fused_projections(quantize_model(Transformer(odd), scheme))[0][0] is None
    assert fused_projections(quantize_model(Transformer(TINY), scheme))[0][0] is not None


def test_dynamic_rope_takes_the_general_path():
    model = Transformer(TINY.replace(rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    assert not DecodeStep.supports(model)
    with pytest.raises(ValueError):
        DecodeStep(model, KVCache.empty(model.cfg, 1, 8))


def test_modules_with_hooks_are_called_as_modules(monkeypatch):
    """A Linear or norm with hooks (tensor parallel's redistributions) runs through its own call."""
    torch.manual_seed(0)
    model = Transformer(WIDE).eval()
    calls = []
    block = model.layers["0"]
    for module in (block.attention.q_proj, block.attention.o_proj, block.ffn_norm):
        module.register_forward_hook(lambda m, args, out: calls.append(type(m).__name__))
    fast = _logits(model, PROMPTS[0], fast=True, monkeypatch=monkeypatch, n=3)
    assert calls.count("Linear") >= 2 * 4 and calls.count("RMSNorm") >= 4    # the prompt, then 3 steps
    assert fused_projections(model)[0][0] is None                            # a hooked part is not fused
    assert torch.equal(fast, _logits(model, PROMPTS[0], fast=False, monkeypatch=monkeypatch, n=3))


@pytest.mark.parametrize("scheme", ["none", "int4"])
def test_compiled_step_follows_the_cache_and_serves_spans(scheme):
    """A server's span step (blocks 1..2, no head) runs compiled and gives run_blocks' hidden
    states; once the cache's buffers are replaced (select) it takes the Python loop, still equal."""
    if qkernels.extension() is None:
        pytest.skip(f"no compiled kernels here: {qkernels.describe()}")
    torch.manual_seed(0)
    model = quantize_model(Transformer(WIDE.replace(n_layers=3)).eval(), scheme)
    span = lambda h, cache: model.run_blocks(h, start=1, end=3, cache=cache)        # noqa: E731
    caches = [KVCache.empty(model.cfg, 1, 16, layers=range(1, 3)) for _ in range(2)]
    prompt = torch.randn(1, 4, WIDE.dim)
    assert torch.equal(span(prompt, caches[0]), span(prompt, caches[1]))
    step = DecodeStep(model, caches[0], with_head=False, blocks=range(1, 3))
    assert step.plan is not None and not step.plan_head
    assert not step._planned(1)                        # gradients wanted: the Python loop records them
    with torch.no_grad():                              # as a server runs its span (run_span)
        for _ in range(3):
            x = torch.randn(1, 1, WIDE.dim)
            assert step._planned(1) and torch.equal(step.run(x), span(x, caches[1]))
        caches[0].select([0])
        assert not step._planned(1)
        x = torch.randn(1, 1, WIDE.dim)
        assert torch.equal(step.run(x), span(x, caches[1]))


@pytest.mark.parametrize("width", [64, 384, 512, 1000, 4096])
def test_compiled_rms_norm_equals_torch(width):
    """The compiled step's RMSNorm (ATen's steps into kept buffers) is torch.rms_norm bit for bit."""
    if qkernels.extension() is None:
        pytest.skip(f"no compiled kernels here: {qkernels.describe()}")
    gen = torch.Generator().manual_seed(width)
    x = torch.randn(1, width, generator=gen) * torch.logspace(-4, 4, width)
    w = torch.randn(width, generator=gen)
    for eps in (1e-5, 1e-6):
        assert torch.equal(qkernels.extension().rms_norm_steps(x, w, eps), torch.rms_norm(x, (width,), w, eps))
