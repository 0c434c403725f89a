"""Weight-only int8 / int4 quantization: kernels against the reference, whole models, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from swarmlm.cli import main
from swarmlm.errors import UserError
from swarmlm.model.config import PRESETS
from swarmlm.model import qkernels
from swarmlm.model.generate import generate
from swarmlm.model.quant import (QuantLinear, QuantScheme, block_weight_bytes, check_quantizable, parse_scheme,
                                 quantize_model, weight_bytes)
from swarmlm.model.transformer import Transformer

TINY = PRESETS["tiny"].replace(vocab_size=300, n_layers=2, max_seq_len=64)
SCHEMES = ["int8", "int4", "int4-g64", "int4-g128"]


def _linear(n=96, k=128, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias)


def _reference_only(monkeypatch):
    """Run the products on the torch reference, as a machine without the compiled kernels does."""
    monkeypatch.setattr(qkernels, "_EXT", [None])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_compiled_kernels_equal_the_reference_bit_for_bit(scheme, monkeypatch):
    if qkernels.extension() is None:
        pytest.skip("no compiled kernels here (no compiler or no AVX512-VNNI): the reference runs everywhere")
    lin = _linear(n=96, k=200)      # a width that is padded (int8: no; int4: to whole groups)
    fast = QuantLinear(lin, parse_scheme(scheme))
    assert fast.fast
    x = torch.randn(5, 3, 200) * torch.logspace(-3, 2, 5)[:, None, None]     # rows of very different sizes
    x[0, 0] = 0                                                                 # and an all-zero row
    x[0, 1] = (torch.arange(200) % 9 - 4) + 0.5                                 # x / sx on .5 ties: half to even
    x[0, 1, 7] = 127.0                                                          # (sx is exactly 1)
    got = fast(x)
    _reference_only(monkeypatch)
    assert torch.equal(got, fast(x))
    assert torch.equal(fast.rows_fn()(x[1]), fast(x[1]))


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_products_do_not_depend_on_the_thread_count(scheme):
    q = QuantLinear(_linear(n=512, k=1024, bias=False, seed=3), parse_scheme(scheme))   # big enough to be split
    x = torch.randn(2, 1024)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = q(x)
        torch.set_num_threads(2)
        assert torch.equal(q(x), alone)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_each_row_is_computed_alone(scheme):
    """A row's product does not depend on the rows beside it: a prompt's forward and the same
    tokens decoded one by one give the same numbers (on either path)."""
    q = QuantLinear(_linear(n=64, k=128, seed=2), parse_scheme(scheme))
    x = torch.randn(7, 128)
    together = q(x)
    assert all(torch.equal(together[i], q(x[i:i + 1])[0]) for i in range(7))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_products_follow_the_dequantized_weights(scheme, monkeypatch):
    lin = _linear(seed=1)
    q = QuantLinear(lin, parse_scheme(scheme))
    x = torch.randn(4, 128)
    reference = x @ q.dequantized(torch.float32).t() + lin.bias         # only the input's int8 rounding differs
    torch.testing.assert_close(q(x), reference, atol=3e-2, rtol=1e-2)
    _reference_only(monkeypatch)
    torch.testing.assert_close(q(x), reference, atol=3e-2, rtol=1e-2)


def test_kernel_layouts_round_trip():
    q8 = torch.randint(-127, 128, (32, 24), dtype=torch.int8)
    assert torch.equal(qkernels.unpack_int8(qkernels.pack_int8(q8)), q8)
    q4 = torch.randint(0, 16, (48, 64))
    assert torch.equal(qkernels.unpack_int4(qkernels.pack_int4(q4)).long(), q4)


@pytest.mark.parametrize("group", [8, 24, 32, 64, 128])
def test_int4_kernel_equals_the_reference_for_any_group(group):
    """Every group the kernel takes (its unrolled 32 / 64 / 128 paths, an odd count of 8-column
    steps, the generic loop), with extreme nibbles and activations."""
    if qkernels.extension() is None:
        pytest.skip("no compiled kernels here (no compiler or no AVX512-VNNI)")
    gen = torch.Generator().manual_seed(group)
    N, K = 48, 384
    q = torch.randint(0, 16, (N, K), generator=gen)
    q[0] = 15                                                      # every nibble at its largest
    scales = torch.rand(N // 16, K // group, 16, generator=gen).to(torch.bfloat16)
    lows = (torch.randn(N // 16, K // group, 16, generator=gen) * 4).to(torch.bfloat16)
    x = torch.randn(3, K, generator=gen)
    x[1] = -127.0                                                  # the largest negative activations
    w = qkernels.pack_int4(q)
    got = qkernels.extension().int4_gemm(x, w, scales, lows, group)
    assert torch.equal(got, qkernels.int4_reference(x, w, scales, lows, group))


@pytest.mark.parametrize("scheme,tol", [("int8", 0.02), ("int4", 0.15)])
def test_quantized_weights_stay_close_to_the_float_ones(scheme, tol):
    lin = _linear(n=256, k=256, bias=False)
    q = QuantLinear(lin, parse_scheme(scheme))
    err = (q.dequantized(torch.float32) - lin.weight).abs().max() / lin.weight.abs().max()
    assert 0 < err < tol


def test_a_width_not_a_multiple_of_the_group_is_padded():
    lin = _linear(n=40, k=176)
    q = QuantLinear(lin, parse_scheme("int4-g64"))
    assert q.pad == 16 and q.pad_rows == 8            # columns to whole groups, rows to blocks of 16
    x = torch.randn(3, 176)
    reference = x @ q.dequantized(torch.float32).t() + lin.bias
    torch.testing.assert_close(q(x), reference, atol=3e-2, rtol=1e-2)
    assert q(x).shape == (3, 40)
    assert (q.dequantized(torch.float32) - lin.weight).abs().max() < 0.1 * lin.weight.abs().max()


def test_input_gradient_flows_through_frozen_quantized_weights():
    q = QuantLinear(_linear(), parse_scheme("int4"))
    x = torch.randn(3, 128, requires_grad=True)
    g = torch.randn(3, 96)
    (q(x) * g).sum().backward()
    torch.testing.assert_close(x.grad, g @ q.dequantized(torch.float32), atol=1e-4, rtol=1e-4)
    assert not any(p.requires_grad for p in q.parameters())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_model_generates_like_the_float_one_at_first(scheme):
    torch.manual_seed(0)
    model = Transformer(TINY).eval()
    x = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        ref = model(x)
        quantize_model(model, scheme)
        out = model(x)
    assert model.quantization == parse_scheme(scheme).name
    assert all(type(m) is not nn.Linear for m in model.modules())
    assert isinstance(model.output, QuantLinear) and model.output.scheme.bits == 8   # the head in int8
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert cos > (0.999 if scheme == "int8" else 0.98)
    prompts = [[5, 17, 42], [250]]
    assert generate(model, prompts, max_new_tokens=6) == [generate(model, p, max_new_tokens=6) for p in prompts]


def test_quantized_span_is_smaller_and_planned_size_matches():
    cfg = PRESETS["small"].replace(n_layers=2)
    for name in ("none", "int8", "int4", "int4-g128"):
        torch.manual_seed(0)
        model = Transformer(cfg, layers=range(0, 1), with_embed=False, with_head=False)
        quantize_model(model, name)
        assert weight_bytes(model) == pytest.approx(block_weight_bytes(cfg, parse_scheme(name)), rel=0.01)
    assert block_weight_bytes(cfg, QuantScheme(4, 32)) < 0.65 * block_weight_bytes(cfg, QuantScheme(8))


def test_a_model_is_quantized_once():
    model = quantize_model(Transformer(TINY), "int8")
    assert quantize_model(model, "int8") is model and model.quantization == "int8"
    with pytest.raises(ValueError, match="already quantized as int8"):
        quantize_model(model, "int4")


def test_bad_schemes_are_user_errors():
    for text, message in [("int3", "unknown quantization"), ("int8-g32", "unknown quantization"),
                          ("int4-g16", "group size must be one of"), ("fp8", "unknown quantization")]:
        with pytest.raises(UserError, match=message):
            parse_scheme(text)
    assert parse_scheme("INT4").name == "int4-g32" and parse_scheme(None).name == "none"
    with pytest.raises(UserError, match="dim 64 is narrower than the group size 128"):
        check_quantizable(TINY, parse_scheme("int4-g128"))
    check_quantizable(TINY, parse_scheme("int4-g64"))      # ffn_dim 176: padded to 192


def test_generate_cli_with_quantization(tmp_path, capsys):
    from swarmlm.model.hf import save_model
    from swarmlm.model.tokenizer import Tokenizer
    torch.manual_seed(0)
    tok = Tokenizer.train_bpe(["hello world, the quick brown fox jumps over the lazy dog"] * 20, vocab_size=300)
    save_model(Transformer(TINY), TINY, tmp_path, tokenizer=tok)
    args = ["generate", str(tmp_path), "--prompt", "hello world", "--max-new-tokens", "5", "--temperature", "0",
            "--json"]
    assert main(args + ["--quantize", "int4-g64"]) == 0
    assert len(json.loads(capsys.readouterr().out)["output_ids"]) == 5
    assert main(args + ["--quantize", "int4-g128"]) == 2
    err = capsys.readouterr().err
    assert "dim 64 is narrower than the group size 128" in err and len(err.strip().splitlines()) == 1


_WATCH_META_PATH = """
import sys
from swarmlm.model import qkernels
if sys.argv[1] == "prepared":
    qkernels._import_tools()
changes = []
class Watched(list):
    def insert(self, i, x):
        changes.append("insert"); super().insert(i, x)
    def remove(self, x):
        changes.append("remove"); super().remove(x)
sys.meta_path = Watched(sys.meta_path)
from torch.utils import cpp_extension    # what the first build imports, on whatever thread asks
print(",".join(changes) or "none")
"""


@pytest.mark.parametrize("how, expect", [("cold", "insert,remove"), ("prepared", "none")])
def test_prepared_kernels_leave_the_import_path_alone_for_other_threads(how, expect):
    # setuptools (which cpp_extension imports) inserts and removes an entry at the front of
    # sys.meta_path; a thread importing meanwhile can skip the path finder (a server once failed to
    # start so). The cold run shows the test sees those changes; after prepare()'s import, none.
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", _WATCH_META_PATH, how], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    if how == "cold" and out.stdout.strip() == "none":
        pytest.skip("this setuptools leaves sys.meta_path alone")
    assert out.stdout.strip() == expect
