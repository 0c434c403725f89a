"""Transformer on its own: cut into parts, KV-cache decoding, left padding, dtypes."""

import pytest
import torch

from swarmlm.errors import UserError
from swarmlm.model.cache import KVCache
from swarmlm.model.config import PRESETS, ModelConfig
from swarmlm.model.transformer import Transformer

TINY = PRESETS["tiny"].replace(vocab_size=512)
GPT2 = TINY.replace(family="gpt2", architecture="GPT2LMHeadModel", n_kv_heads=4, attn_bias=True,
                    attn_out_bias=True, mlp_bias=True)


def _model(cfg=TINY, seed=0, **kw):
    torch.manual_seed(seed)
    return Transformer(cfg, **kw).eval()


def _ids(B=2, T=10, V=512, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cfg", [TINY, GPT2], ids=["llama", "gpt2"])
@torch.no_grad()
def test_cached_decoding_equals_full_forward(cfg):
    model, x = _model(cfg), _ids()
    full = model(x)
    cache = KVCache.empty(cfg, batch=2, max_len=16)
    parts = [model(x[:, a:b], cache=cache) for a, b in ((0, 6), (6, 8), (8, 9), (9, 10))]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 10


@pytest.mark.parametrize("cfg", [TINY, GPT2], ids=["llama", "gpt2"])
@torch.no_grad()
def test_left_padded_rows_equal_rows_alone(cfg):
    model = _model(cfg)
    rows = [_ids(1, 7, seed=2)[0], _ids(1, 4, seed=3)[0]]
    batch = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    for r, ids in enumerate(rows):
        batch[r, 7 - len(ids):], mask[r, 7 - len(ids):] = ids, True
    cache = KVCache.empty(cfg, batch=2, max_len=12)
    first = model(batch, cache=cache, key_mask=mask)
    nxt = torch.tensor([[5], [9]])
    second = model(nxt, cache=cache)
    for r, ids in enumerate(rows):
        alone = model(torch.cat([ids, nxt[r]])[None])
        torch.testing.assert_close(first[r, 7 - len(ids):], alone[0, :-1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(second[r, 0], alone[0, -1], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_parts_chain_to_the_whole_model():
    whole = _model()
    front = Transformer(TINY, layers=range(0, 2), with_head=False)
    back = Transformer(TINY, layers=range(2, 4), with_embed=False)
    front.load_state_dict({k: v for k, v in whole.state_dict().items() if k in front.state_dict()})
    back.load_state_dict({k: v for k, v in whole.state_dict().items() if k in back.state_dict()})
    x = _ids()
    torch.testing.assert_close(back(front(x)), whole(x))
    assert list(back.layers) == ["2", "3"] and back.tok_embeddings is None and front.output is None


@torch.no_grad()
def test_run_blocks_with_range_and_deleted_parts():
    model = _model()
    x = _ids()
    h = model.embed(x)
    staged = model.run_blocks(model.run_blocks(h, end=2), start=2)
    torch.testing.assert_close(model.head(staged), model(x))
    del model.layers["3"]
    model.output = None
    assert model(x).shape == (2, 10, TINY.dim)


def test_tied_head_shares_the_embedding():
    model = _model()
    assert model.output.weight is model.tok_embeddings.weight


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_low_precision_forward_is_close_to_float32(dtype):
    model, x = _model(), _ids()
    ref = model(x)
    low = model.to(dtype)(x)
    assert low.dtype == dtype
    torch.testing.assert_close(low.float(), ref, atol=0.05, rtol=0.05)


def test_config_validation_rejects_inconsistent_heads():
    with pytest.raises(UserError, match="n_kv_heads"):
        ModelConfig(n_heads=4, n_kv_heads=3).validate()
    with pytest.raises(UserError, match="architecture"):
        ModelConfig(architecture="BertModel").validate()
    with pytest.raises(UserError, match="outside"):
        Transformer(TINY, layers=range(2, 9))


def test_presets_have_the_promised_sizes():
    assert PRESETS["tiny"].validate().n_layers <= 4
    assert 20e6 < PRESETS["small"].n_params() < 40e6
    model = Transformer(PRESETS["tiny"])
    assert sum(p.numel() for p in model.parameters()) == PRESETS["tiny"].n_params()
