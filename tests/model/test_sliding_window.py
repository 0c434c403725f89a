"""Sliding-window attention (Mistral, Qwen2) equals transformers beyond the window."""

from __future__ import annotations

import pytest
import torch

from swarmlm.errors import CheckpointError, UserError
from swarmlm.model import hf
from swarmlm.model.cache import KVCache
from swarmlm.model.config import PRESETS
from swarmlm.model.generate import generate
from swarmlm.model.transformer import Transformer
from tests.model.hf_models import VOCAB, build_hf, rewrite_config

transformers = pytest.importorskip("transformers")

WINDOW = 8
WINDOWED = {  # variant, config overrides
    "mistral": ("mistral", dict(sliding_window=WINDOW)),
    "qwen2_upper": ("qwen2", dict(sliding_window=WINDOW, use_sliding_window=True, max_window_layers=1)),
}


def _ids(B=2, T=3 * WINDOW, seed=3):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=list(WINDOWED))
def pair(request, tmp_path):
    variant, overrides = WINDOWED[request.param]
    ref = build_hf(tmp_path, variant, **overrides)
    model, cfg = hf.load_model(tmp_path)
    return ref, model, cfg, tmp_path


def test_window_is_read_from_config_not_capping_context(pair):
    ref, model, cfg, _ = pair
    assert cfg.sliding_window == WINDOW
    assert cfg.max_seq_len == 128 and cfg.context_len == 128
    assert [cfg.windowed(i) for i in range(cfg.n_layers)] == [
        getattr(ref.config, "layer_types", ["sliding_attention"] * 2)[i] == "sliding_attention" for i in range(2)]


@torch.no_grad()
def test_logits_match_transformers_beyond_the_window(pair):
    ref, model, cfg, _ = pair
    x = _ids()
    ours = model(x)
    torch.testing.assert_close(ours, ref(x).logits, atol=1e-4, rtol=1e-4)
    # the window matters: the same weights with full attention differ from slot W on
    unwindowed = Transformer(cfg.replace(sliding_window=None)).eval()
    unwindowed.load_state_dict(model.state_dict())
    full = unwindowed(x)
    torch.testing.assert_close(full[:, :WINDOW], ours[:, :WINDOW])
    assert not torch.allclose(full[:, WINDOW:], ours[:, WINDOW:], atol=1e-3)


@torch.no_grad()
def test_incremental_decoding_with_cache_matches_transformers(pair):
    ref, model, cfg, _ = pair
    x = _ids()
    expected = ref(x).logits
    cache = KVCache.empty(cfg, batch=2, max_len=x.shape[1])
    steps = [model(x[:, :5], cache=cache)] + [model(x[:, t:t + 1], cache=cache) for t in range(5, x.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), expected, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_padded_batch_greedy_tokens_match_transformers_generate(pair):
    ref, model, cfg, _ = pair
    prompts = [_ids(1, 11, seed=5)[0].tolist(), _ids(1, 5, seed=6)[0].tolist()]
    ids = torch.zeros(2, 11, dtype=torch.long)
    mask = torch.zeros(2, 11, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, 11 - len(p):] = torch.tensor(p)
        mask[r, 11 - len(p):] = 1
    out = ref.generate(ids, attention_mask=mask, max_new_tokens=3 * WINDOW, do_sample=False, pad_token_id=0)
    assert generate(model, prompts, max_new_tokens=3 * WINDOW) == out[:, 11:].tolist()


@torch.no_grad()
def test_saved_windowed_checkpoint_loads_in_transformers(pair, tmp_path):
    ref, model, cfg, _ = pair
    hf.save_model(model, cfg, tmp_path / "out")
    again = getattr(transformers, cfg.architecture).from_pretrained(tmp_path / "out").eval()
    x = _ids()
    torch.testing.assert_close(again(x).logits, model(x), atol=1e-4, rtol=1e-4)
    assert hf.load_config(tmp_path / "out") == cfg


def test_qwen2_window_off_without_use_sliding_window(tmp_path):
    build_hf(tmp_path, "qwen2", sliding_window=WINDOW, use_sliding_window=False)
    rewrite_config(tmp_path, sliding_window=WINDOW)  # some checkpoints keep the size with the switch off
    assert hf.load_config(tmp_path).sliding_window is None


def test_bad_window_configs_are_one_line_errors(tmp_path):
    build_hf(tmp_path, "mistral", sliding_window=WINDOW)
    rewrite_config(tmp_path, sliding_window=-3)
    with pytest.raises(CheckpointError, match="sliding_window must be a positive integer"):
        hf.load_config(tmp_path)
    build_hf(tmp_path / "q", "qwen2", sliding_window=WINDOW, use_sliding_window=True, max_window_layers=1)
    rewrite_config(tmp_path / "q", layer_types=["sliding_attention", "full_attention"])
    with pytest.raises(CheckpointError, match="unsupported layer_types"):
        hf.load_config(tmp_path / "q")
    with pytest.raises(UserError, match="sliding_window needs the llama family and a positive size"):
        PRESETS["tiny"].replace(sliding_window=0).validate()


@torch.no_grad()
def test_qwen2_without_layer_types_windows_from_max_window_layers(tmp_path):
    ref = build_hf(tmp_path, "qwen2", sliding_window=WINDOW, use_sliding_window=True, max_window_layers=1)
    rewrite_config(tmp_path, layer_types=None)  # configs written before transformers listed layer types
    model, cfg = hf.load_model(tmp_path)
    assert (cfg.sliding_window, cfg.window_from_layer) == (WINDOW, 1)
    x = _ids()
    torch.testing.assert_close(model(x), ref(x).logits, atol=1e-4, rtol=1e-4)
