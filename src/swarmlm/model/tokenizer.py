"""Tokenizer: the `tokenizers` library's byte-level BPE, loaded from and saved as `tokenizer.json`.

Knows nothing of models or training loops: text in, ids out.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from swarmlm.errors import CheckpointError

EOS_TOKEN = "<|endoftext|>"


class Tokenizer:
    """A thin, typed wrapper over `tokenizers.Tokenizer`."""

    def __init__(self, inner: HFTokenizer, eos_token: str | None = EOS_TOKEN):
        self.inner = inner
        self.eos_token = eos_token if eos_token is not None and inner.token_to_id(eos_token) is not None else None
        self.eos_id = inner.token_to_id(self.eos_token) if self.eos_token else None

    @property
    def vocab_size(self) -> int:
        return self.inner.get_vocab_size(with_added_tokens=True)

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int = 4096, *, show_progress: bool = False) -> "Tokenizer":
        """Train a GPT-2-style byte-level BPE on `texts`, with `<|endoftext|>` as its one special token."""
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=show_progress,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load `tokenizer.json` from a file or a checkpoint directory."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise CheckpointError(f"no tokenizer.json in {path}")
        try:
            inner = HFTokenizer.from_file(str(file))
        except Exception as e:
            raise CheckpointError(f"{file} is not a valid tokenizer.json: {e}") from None
        eos = EOS_TOKEN
        config = file.parent / "tokenizer_config.json"
        if config.is_file():
            try:
                value = json.loads(config.read_text()).get("eos_token")
                if isinstance(value, dict):
                    value = value.get("content")
                if isinstance(value, str):
                    eos = value
            except (OSError, ValueError):
                pass
        return cls(inner, eos)

    def save(self, directory: str | os.PathLike) -> None:
        """Write `tokenizer.json` and a `tokenizer_config.json` that transformers understands, atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _write_atomic(directory / "tokenizer.json", self.inner.to_str(pretty=False))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30}
        if self.eos_token:
            config.update(eos_token=self.eos_token, bos_token=self.eos_token, unk_token=self.eos_token)
        _write_atomic(directory / "tokenizer_config.json", json.dumps(config, indent=2))

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.inner.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.inner.decode(list(ids), skip_special_tokens=False)

    def decode_stream(self, ids: Iterable[int]) -> Iterator[str]:
        """Yield text pieces as ids arrive, holding back bytes of an unfinished UTF-8 character."""
        seen: list[int] = []
        emitted = ""
        for i in ids:
            seen.append(i)
            text = self.decode(seen)
            if text.endswith("\ufffd"):
                continue
            yield text[len(emitted):]
            emitted = text


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
