"""Token shards: a corpus tokenized once into memory-mapped token files, cached on disk.

`prepare_tokens` writes `train.bin` and `val.bin` (uint16 or uint32 ids, documents joined by
the end-of-sequence token) under a cache folder keyed by the corpus fingerprint and the
tokenizer, so the second run starts at once. `Batches` cuts training windows out of a shard
as a pure function of (seed, stream, step): resuming at step N gives exactly the batches an
uninterrupted run would have seen, and peers with different streams see different data.
Knows nothing of models.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from swarmlm.data.corpus import Corpus
from swarmlm.errors import DataError
from swarmlm.model.tokenizer import Tokenizer


def default_cache_dir() -> Path:
    home = os.environ.get("SWARMLM_HOME") or os.path.join(os.path.expanduser("~"), ".swarmlm")
    return Path(home) / "cache"


def tokenizer_texts(corpus: Corpus, max_bytes: int) -> list[str]:
    """The first `max_bytes` of the training split, in corpus order: what the BPE learns from."""
    texts, total = [], 0
    for doc in corpus.documents("train"):
        texts.append(doc.text)
        total += len(doc.text)
        if total >= max_bytes:
            break
    if not texts:
        raise DataError(f"corpus {corpus.name} has no readable training text")
    return texts


def load_or_train_tokenizer(corpus: Corpus, vocab_size: int, *, cache_dir: Path | None = None,
                            max_bytes: int = 4_000_000) -> Tokenizer:
    """A BPE tokenizer for `corpus`, trained once and cached by corpus fingerprint and vocabulary size."""
    folder = (cache_dir or default_cache_dir()) / "tokenizers" / f"{corpus.fingerprint()}-{vocab_size}-{max_bytes}"
    if (folder / "tokenizer.json").is_file():
        return Tokenizer.load(folder)
    tok = Tokenizer.train_bpe(tokenizer_texts(corpus, max_bytes), vocab_size)
    tok.save(folder)
    return tok


@dataclass(frozen=True)
class TokenShards:
    train: np.ndarray      # memory-mapped token ids
    val: np.ndarray
    folder: Path


def prepare_tokens(corpus: Corpus, tokenizer: Tokenizer, *, cache_dir: Path | None = None,
                   progress: bool = True) -> TokenShards:
    """Tokenize `corpus` into cached memory-mapped shards, or open the cached ones."""
    tok_hash = hashlib.sha256(tokenizer.inner.to_str().encode()).hexdigest()[:16]
    folder = (cache_dir or default_cache_dir()) / "tokens" / f"{corpus.fingerprint()}-{tok_hash}"
    meta_path = folder / "meta.json"
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    if not meta_path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        counts = {split: _write_split(corpus, tokenizer, split, folder / f"{split}.bin", dtype, progress)
                  for split in ("train", "val")}
        _write_atomic(meta_path, json.dumps({"dtype": np.dtype(dtype).name, "counts": counts, "corpus": corpus.name}))
    meta = json.loads(meta_path.read_text())
    shards = {s: _open(folder / f"{s}.bin", np.dtype(meta["dtype"]), meta["counts"][s]) for s in ("train", "val")}
    if len(shards["train"]) < 2:
        raise DataError(f"corpus {corpus.name} has too little training text")
    if len(shards["val"]) < 2:   # a tiny corpus: validate on the training text rather than on nothing
        shards["val"] = shards["train"]
    return TokenShards(shards["train"], shards["val"], folder)


def _write_split(corpus: Corpus, tok: Tokenizer, split: str, path: Path, dtype, progress: bool) -> int:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    count = 0
    eos = [tok.eos_id] if tok.eos_id is not None else []
    docs = corpus.documents(split)
    bar = tqdm(desc=f"tokenizing {split}", unit=" docs", disable=not progress, leave=False)
    with open(tmp, "wb") as out:
        while True:
            batch = [d.text for _, d in zip(range(64), docs)]
            if not batch:
                break
            for ids in tok.encode_batch(batch):
                arr = np.asarray(ids + eos, dtype=dtype)
                out.write(arr.tobytes())
                count += len(arr)
            bar.update(len(batch))
    bar.close()
    os.replace(tmp, path)
    return count


def _open(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    if count == 0:
        return np.zeros(0, dtype=dtype)
    if not path.is_file() or path.stat().st_size != count * dtype.itemsize:
        raise DataError(f"token cache {path} is damaged; delete {path.parent} to rebuild it")
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class Batches:
    """Training windows as a pure function of (seed, stream, step)."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, stream: int = 0):
        if len(tokens) < seq_len + 2:
            raise DataError(f"corpus has {len(tokens)} tokens, fewer than one window of {seq_len + 1}")
        self.tokens, self.batch_size, self.seq_len, self.seed, self.stream = tokens, batch_size, seq_len, seed, stream

    def get(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, each (B, T) int64, for optimizer step `step`, micro-batch `micro`."""
        rng = np.random.default_rng([self.seed, self.stream, step, micro])
        starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.batch_size)
        window = np.stack([np.asarray(self.tokens[s:s + self.seq_len + 1], dtype=np.int64) for s in starts])
        w = torch.from_numpy(window)                       # (B, T+1)
        return w[:, :-1], w[:, 1:]


def eval_windows(tokens: np.ndarray, seq_len: int, n_windows: int) -> torch.Tensor:
    """Fixed, evenly spaced (N, T+1) windows: the same validation set on every run."""
    if len(tokens) < seq_len + 1:
        raise DataError(f"validation split has {len(tokens)} tokens, fewer than one window of {seq_len + 1}")
    n_windows = max(1, min(n_windows, (len(tokens) - 1) // (seq_len + 1)))
    stride = (len(tokens) - seq_len - 1) // n_windows if n_windows > 1 else 0
    rows = [np.asarray(tokens[i * stride:i * stride + seq_len + 1], dtype=np.int64) for i in range(n_windows)]
    return torch.from_numpy(np.stack(rows))
