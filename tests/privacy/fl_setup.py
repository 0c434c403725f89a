"""A tiny model and five private shards of the embedded corpus for federated tests and benchmarks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from swarmlm.data.corpus import stdlib_root
from swarmlm.model.config import PRESETS
from swarmlm.model.hf import save_model
from swarmlm.model.tokenizer import Tokenizer
from swarmlm.model.transformer import Transformer

STDLIB_FILES = ("textwrap.py", "shlex.py", "fnmatch.py", "bisect.py", "colorsys.py", "glob.py", "keyword.py",
                "string.py", "heapq.py", "queue.py", "sched.py", "graphlib.py")
SPLIT = (0.35, 0.25, 0.2, 0.12, 0.08)          # uneven shares of the text, one per client


def corpus_text() -> str:
    root = stdlib_root()
    return "\n".join((root / f).read_text(encoding="utf-8") for f in STDLIB_FILES if (root / f).is_file())


def build_model(directory: Path, *, dim: int = 64, n_layers: int = 2, vocab: int = 384, seed: int = 0) -> Path:
    """A random tiny llama with a BPE tokenizer trained on the corpus, saved as an HF checkpoint."""
    tok = Tokenizer.train_bpe([corpus_text()], vocab_size=vocab)
    cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=-(-tok.vocab_size // 64) * 64, dim=dim, n_layers=n_layers,
                              ffn_dim=dim * 3, eos_token_id=tok.eos_id, bos_token_id=tok.eos_id).validate()
    torch.manual_seed(seed)
    save_model(Transformer(cfg), cfg, directory, tokenizer=tok)
    return Path(directory)


def write_shards(directory: Path, split=SPLIT) -> list[Path]:
    """Disjoint, unevenly sized files of the corpus's lines; and `union.txt`, all of them."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = corpus_text().splitlines(keepends=True)
    out, start = [], 0
    for i, share in enumerate(split):
        end = len(lines) if i == len(split) - 1 else start + int(share * len(lines))
        path = directory / f"client{i}.txt"
        path.write_text("".join(lines[start:end]), encoding="utf-8")
        out.append(path)
        start = end
    (directory / "union.txt").write_text("".join(lines), encoding="utf-8")
    return out
