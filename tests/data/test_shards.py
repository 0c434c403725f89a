import numpy as np
import pytest
import torch

from swarmlm.data.corpus import open_corpus
from swarmlm.data.shards import Batches, eval_windows, load_or_train_tokenizer, prepare_tokens
from swarmlm.errors import DataError


@pytest.fixture()
def corpus(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(40):
        (root / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * 20)
    return open_corpus(root, val_percent=20)


def test_tokens_are_cached_and_reopened(corpus, tmp_path):
    tok = load_or_train_tokenizer(corpus, 300, cache_dir=tmp_path / "cache")
    first = prepare_tokens(corpus, tok, cache_dir=tmp_path / "cache", progress=False)
    again = prepare_tokens(corpus, tok, cache_dir=tmp_path / "cache", progress=False)
    assert first.folder == again.folder and np.array_equal(first.train, again.train)
    assert isinstance(again.train, np.memmap) and len(first.val) > 0


def test_tokens_decode_back_to_the_corpus(corpus, tmp_path):
    tok = load_or_train_tokenizer(corpus, 300, cache_dir=tmp_path / "cache")
    shards = prepare_tokens(corpus, tok, cache_dir=tmp_path / "cache", progress=False)
    text = tok.decode(shards.train.tolist())
    first_doc = next(corpus.documents("train"))
    assert text.startswith(first_doc.text + "<|endoftext|>")


def test_damaged_cache_is_reported(corpus, tmp_path):
    tok = load_or_train_tokenizer(corpus, 300, cache_dir=tmp_path / "cache")
    shards = prepare_tokens(corpus, tok, cache_dir=tmp_path / "cache", progress=False)
    with open(shards.folder / "train.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match="damaged"):
        prepare_tokens(corpus, tok, cache_dir=tmp_path / "cache", progress=False)


def test_batches_are_a_pure_function_of_step():
    tokens = np.arange(1000, dtype=np.uint16)
    a, b = Batches(tokens, 4, 16, seed=1), Batches(tokens, 4, 16, seed=1)
    x1, y1 = a.get(5)
    x2, _ = b.get(5)
    assert torch.equal(x1, x2) and torch.equal(x1[:, 1:], y1[:, :-1]) and x1.dtype == torch.int64
    assert not torch.equal(a.get(6)[0], x1)
    assert not torch.equal(Batches(tokens, 4, 16, seed=1, stream=1).get(5)[0], x1)


def test_too_short_corpus_is_a_clear_error():
    with pytest.raises(DataError, match="fewer than one window"):
        Batches(np.arange(10, dtype=np.uint16), 2, 16, seed=0)


def test_eval_windows_are_fixed():
    tokens = np.arange(500, dtype=np.uint16)
    w = eval_windows(tokens, 9, 4)
    assert w.shape == (4, 10) and torch.equal(w, eval_windows(tokens, 9, 4))
