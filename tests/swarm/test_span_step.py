"""A server's decode steps (run_span, one token per row) take the lean step and compute exactly run_blocks."""

from __future__ import annotations

import pytest
import torch

from swarmlm.model import qkernels
from swarmlm.model.cache import KVCache
from swarmlm.model.config import PRESETS
from swarmlm.model.fastdecode import DecodeStep, span_step
from swarmlm.model.quant import quantize_model
from swarmlm.model.transformer import Transformer
from swarmlm.swarm.blocks import run_span

CFG = PRESETS["tiny"].replace(vocab_size=300, n_layers=4, dim=128, n_heads=2, n_kv_heads=1, ffn_dim=192,
                              max_seq_len=64)


def _steps(model, start, end, prompt, fast: bool, n: int = 6) -> list[torch.Tensor]:
    """Hidden states out of blocks [start, end) for a prompt then n one-token steps (inputs seeded)."""
    cache = KVCache.empty(model.cfg, prompt.shape[0], 32, layers=range(start, end))
    gen = torch.Generator().manual_seed(1)
    outs = []
    with torch.inference_mode():
        outs.append(run_span(model, prompt, start, end, cache=cache))
        for _ in range(n):
            h = torch.randn(prompt.shape[0], 1, model.cfg.dim, generator=gen)
            outs.append(run_span(model, h, start, end, cache=cache) if fast
                        else model.run_blocks(h, start=start, end=end, cache=cache))
    assert cache.length == prompt.shape[1] + n
    assert bool(cache.__dict__.get("_decode_steps")) == fast      # the lean step ran (or did not)
    return outs


@pytest.mark.parametrize("scheme", ["none", "int8", "int4"])
@pytest.mark.parametrize("batch", [1, 2])
def test_span_decode_step_equals_run_blocks(scheme, batch):
    torch.manual_seed(0)
    full = quantize_model(Transformer(CFG).eval(), scheme)
    server = quantize_model(Transformer(CFG, layers=range(1, 3), with_embed=False, with_head=False), scheme)
    server.load_state_dict({k: v for k, v in full.state_dict().items() if k in server.state_dict()})
    prompt = torch.randn(batch, 5, CFG.dim, generator=torch.Generator().manual_seed(2))
    for model, (start, end) in [(server, (1, 3)), (server, (2, 3)), (full, (0, 4))]:
        fast, slow = _steps(model, start, end, prompt, True), _steps(model, start, end, prompt, False)
        assert all(torch.equal(a, b) for a, b in zip(fast, slow))


def test_span_step_is_built_once_per_cache_and_only_where_it_applies():
    torch.manual_seed(0)
    model = Transformer(CFG).eval()
    cache = KVCache.empty(CFG, 1, 8, layers=range(0, 2))
    step = span_step(model, cache, 0, 2)
    assert isinstance(step, DecodeStep) and span_step(model, cache, 0, 2) is step
    assert [layer.index for layer in step.layers] == [0, 1]
    assert span_step(model, cache, 0, 3) is None              # the cache lacks block 2
    dynamic = Transformer(CFG.replace(rope_scaling={"rope_type": "dynamic", "factor": 2.0})).eval()
    assert span_step(dynamic, KVCache.empty(CFG, 1, 8), 0, 4) is None


def test_a_decode_step_under_inference_mode_leaves_the_model_trainable():
    """A server decodes under inference mode and may then run a fine-tuning client's forward and
    backward through the same blocks: the fused weights the lean step made must not turn the
    parameters into inference tensors."""
    torch.manual_seed(0)
    model = Transformer(CFG).eval()
    _steps(model, 0, CFG.n_layers, torch.randn(1, 3, CFG.dim), fast=True)
    h = torch.randn(1, 4, CFG.dim, requires_grad=True)
    model.run_blocks(h, start=0, end=CFG.n_layers).square().sum().backward()
    assert h.grad is not None and all(p.grad is not None for p in model.layers.parameters())


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("batch", [1, 2])
def test_a_step_into_a_buffer_writes_the_same_numbers_and_refuses_nan_without_advancing(compiled, batch, monkeypatch):
    """run_span's `into` (a server's fast-lane buffer): the outputs land in the buffer, which comes back,
    equal to a step without it; outputs with a NaN come back as None and the cache stays where it was
    (the compiled step checks them in C++, the Python loop with torch: B = 2 and no extension)."""
    if not compiled:
        monkeypatch.setattr(DecodeStep, "_compile", lambda self: None)
    torch.manual_seed(0)
    model = Transformer(CFG, layers=range(1, 3), with_embed=False, with_head=False).eval()
    prompt = torch.randn(batch, 4, CFG.dim, generator=torch.Generator().manual_seed(3))
    caches = [KVCache.empty(CFG, batch, 16, layers=range(1, 3)) for _ in range(2)]
    into = torch.full((batch, 1, CFG.dim), 7.0)
    with torch.inference_mode():
        for cache in caches:
            run_span(model, prompt, 1, 3, cache=cache)
        for i in range(3):
            h = torch.randn(batch, 1, CFG.dim, generator=torch.Generator().manual_seed(10 + i))
            want = run_span(model, h, 1, 3, cache=caches[0])
            got = run_span(model, h, 1, 3, cache=caches[1], into=into)
            assert got is into and torch.equal(got, want)
        bad = torch.randn(batch, 1, CFG.dim)
        bad[-1, 0, 5] = float("nan")
        assert run_span(model, bad, 1, 3, cache=caches[1], into=into) is None
        assert caches[1].length == 4 + 3                     # not advanced: the next step overwrites that slot
        bad[-1, 0, 5] = float("inf")
        assert run_span(model, bad, 1, 3, cache=caches[1], into=into) is None
        h = torch.randn(batch, 1, CFG.dim)
        assert torch.equal(run_span(model, h, 1, 3, cache=caches[1], into=into), run_span(model, h, 1, 3, cache=caches[0]))
    assert (span_step(model, caches[1], 1, 3).plan is not None) == (compiled and batch == 1 and qkernels.extension() is not None)
