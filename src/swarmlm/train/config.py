"""Training configuration: `TrainConfig`, the presets, and config files.

A preset name (`--config tiny`) picks a ready-made (ModelConfig, TrainConfig) pair; a TOML
file mirrors the dataclass fields: `[model] preset = "small"` plus any ModelConfig field, and
`[train] steps = 200` sets `TrainConfig.steps`. Knows nothing of data or the loop.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swarmlm.errors import UserError
from swarmlm.model.config import PRESETS as MODEL_PRESETS
from swarmlm.model.config import ModelConfig
from swarmlm.model.t5 import PRESETS as T5_PRESETS
from swarmlm.model.t5 import T5Config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300              # optimizer steps in the whole run (the schedule spans them)
    batch_size: int = 16          # sequences per micro-batch
    seq_len: int = 128            # tokens per sequence
    grad_accum: int = 1           # micro-batches per optimizer step
    lr: float = 3e-3              # peak learning rate, reached after warmup
    min_lr_ratio: float = 0.1     # cosine decays to lr * min_lr_ratio at the last step
    warmup_steps: int = 30        # linear warmup from 0
    weight_decay: float = 0.1     # AdamW decay, on matrices only (not norms, biases)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0        # global gradient-norm clip; 0 turns it off
    eval_every: int = 50          # validation loss every N steps (and at the end)
    eval_windows: int = 32        # validation windows of seq_len tokens
    save_every: int = 100         # checkpoint every N steps (and at the end); 0: only at the end
    seed: int = 0                 # model init, data order
    vocab_size: int = 4096        # the BPE tokenizer is trained to this size
    val_percent: float = 5.0      # share of corpus files held out for validation

    def validate(self) -> "TrainConfig":
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_windows", "vocab_size"):
            if getattr(self, name) <= 0:
                raise UserError(f"train config {name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise UserError("train config needs lr > 0 and 0 <= min_lr_ratio <= 1")
        if self.warmup_steps < 0 or self.save_every < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise UserError("warmup_steps, save_every, grad_clip and weight_decay must not be negative")
        if self.vocab_size < 260:
            raise UserError(f"vocab_size must be at least 260 (256 bytes + specials), got {self.vocab_size}")
        return self


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig | T5Config   # T5Config: an encoder-decoder run (train/t5_loop.py, one process only)
    train: TrainConfig


TRAIN_PRESETS: dict[str, RunConfig] = {
    "tiny": RunConfig(MODEL_PRESETS["tiny"], TrainConfig()),
    "small": RunConfig(MODEL_PRESETS["small"],
                       TrainConfig(steps=2000, batch_size=8, seq_len=256, lr=1e-3, warmup_steps=100,
                                   eval_every=200, save_every=500, vocab_size=8192)),
    # T5 v1.1-style encoder-decoder on span corruption; sequences are the windows before corruption
    "t5-tiny": RunConfig(T5_PRESETS["t5-tiny"], TrainConfig(lr=3e-3, warmup_steps=20)),
}


def load_run_config(name_or_path: str, **overrides: Any) -> RunConfig:
    """A preset by name or a TOML file; `overrides` (non-None) replace TrainConfig fields."""
    if name_or_path in TRAIN_PRESETS:
        run = TRAIN_PRESETS[name_or_path]
    else:
        run = _from_file(Path(name_or_path), name_or_path)
    changes = {k: v for k, v in overrides.items() if v is not None}
    _check_fields(TrainConfig, changes, "option")
    train = dataclasses.replace(run.train, **changes).validate()
    if train.seq_len > run.model.max_seq_len:
        raise UserError(f"seq_len {train.seq_len} exceeds the model's context of {run.model.max_seq_len}")
    return RunConfig(run.model.validate(), train)


def _from_file(path: Path, name: str) -> RunConfig:
    if not path.is_file():
        raise UserError(f"--config {name}: neither a preset ({', '.join(TRAIN_PRESETS)}) nor a file")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"cannot read config {path}: {e}") from None
    unknown = set(doc) - {"model", "train"}
    if unknown:
        raise UserError(f"config {path}: unknown sections {sorted(unknown)} (expected [model], [train])")
    model_doc = dict(doc.get("model", {}))
    preset = model_doc.pop("preset", "tiny")
    if preset not in TRAIN_PRESETS:
        raise UserError(f"config {path}: unknown model preset {preset!r}")
    base = TRAIN_PRESETS[preset]
    _check_fields(type(base.model), model_doc, f"config {path} [model]")
    _check_fields(TrainConfig, doc.get("train", {}), f"config {path} [train]")
    try:
        model = dataclasses.replace(base.model, **model_doc)
        train = dataclasses.replace(base.train, **doc.get("train", {}))
    except TypeError as e:
        raise UserError(f"config {path}: {e}") from None
    return RunConfig(model, train)


def _check_fields(cls: type, values: dict, where: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in fields:
            raise UserError(f"{where}: unknown field {key!r}")
        want = fields[key].type
        if want in ("int", int) and (isinstance(value, bool) or not isinstance(value, int)):
            raise UserError(f"{where}: {key} must be an integer, got {value!r}")
        if want in ("float", float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise UserError(f"{where}: {key} must be a number, got {value!r}")
