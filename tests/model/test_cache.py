"""KVCache helpers: trim rolls back, select keeps rows, the length advances once per forward."""

import pytest
import torch

from swarmlm.errors import UserError

from swarmlm.model.cache import KVCache
from swarmlm.model.config import PRESETS
from swarmlm.model.transformer import Transformer

TINY = PRESETS["tiny"].replace(vocab_size=256, n_layers=2)


def _setup():
    torch.manual_seed(0)
    model = Transformer(TINY).eval()
    x = torch.randint(0, 256, (3, 8), generator=torch.Generator().manual_seed(1))
    return model, x


@torch.no_grad()
def test_length_advances_once_per_forward_and_buffers_cover_the_span():
    cache = KVCache.empty(TINY, batch=2, max_len=10, layers=range(1, 2))
    span = Transformer(TINY, layers=range(1, 2), with_embed=False, with_head=False).eval()
    span(torch.randn(2, 3, TINY.dim), cache=cache)
    assert cache.length == 3 and cache.layers == [1]
    assert cache.layer(1)[0].shape == (2, TINY.n_kv_heads, 10, TINY.dh)
    assert cache.next_pos.tolist() == [3, 3]


@torch.no_grad()
def test_trim_rolls_back_to_an_earlier_length():
    model, x = _setup()
    cache = KVCache.empty(TINY, batch=3, max_len=8)
    model(x[:, :5], cache=cache)
    model(x[:, 5:7], cache=cache)
    cache.trim(5)
    again = model(x[:, 5:8], cache=cache)
    torch.testing.assert_close(again, model(x)[:, 5:8], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_select_keeps_the_chosen_rows():
    model, x = _setup()
    cache = KVCache.empty(TINY, batch=3, max_len=8)
    model(x[:, :6], cache=cache)
    cache.select([2, 0])
    out = model(x[[2, 0], 6:8], cache=cache)
    torch.testing.assert_close(out, model(x[[2, 0]])[:, 6:8], atol=1e-5, rtol=1e-5)


def test_full_cache_is_refused():
    cache = KVCache.empty(TINY, batch=1, max_len=4)
    cache.advance(3)
    with pytest.raises(UserError, match="KV cache full"):
        cache.check_room(2)
