"""Training a T5 preset (`swarmlm train --config t5-tiny`) on T5's span-corruption objective.

The same corpus, tokenizer, token shards, optimizer and schedule as the decoder-only loop
(loop.py); what differs is the model and the examples. `span_corrupt` is a pure function of
a token window and a seeded generator: about 15% of the window, in spans of mean length 3,
is replaced in the input by one sentinel id per span, and the target lists each sentinel
followed by the tokens it hid, then eos (T5 paper §3.1.4). Every window has the same length,
so every example in a batch has the same input and target length: no padding.

The vocabulary is the tokenizer's, then one pad id (also the decoder start), then the
sentinels at the top. One process only: no resume, no torchrun, no swarm.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from swarmlm.data.corpus import open_corpus
from swarmlm.data.shards import Batches, eval_windows, load_or_train_tokenizer, prepare_tokens
from swarmlm.errors import UserError
from swarmlm.log import get_logger
from swarmlm.model.t5 import T5, T5Config, t5_loss
from swarmlm.model.t5_hf import save_t5
from swarmlm.train.config import RunConfig, TrainConfig, load_run_config
from swarmlm.train.loop import METRICS_FILE, VOCAB_MULTIPLE, TrainResult
from swarmlm.train.optim import build_optimizer, lr_at, set_lr

log = get_logger(__name__)
NOISE_DENSITY = 0.15
MEAN_SPAN = 3.0


def _segments(n: int, k: int, rng: np.random.Generator) -> list[int]:
    """k positive lengths summing to n (n >= k), uniformly among such splits."""
    cuts = np.sort(rng.choice(np.arange(1, n), size=k - 1, replace=False)) if k > 1 else np.array([], dtype=int)
    return np.diff(np.concatenate([[0], cuts, [n]])).tolist()


def span_corrupt(window: list[int], cfg: T5Config, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """A token window -> (encoder input, decoder target), both ending with eos."""
    L = len(window)
    n_noise = min(L - 1, max(1, round(L * NOISE_DENSITY)))
    n_spans = max(1, min(cfg.n_sentinels, n_noise, L - n_noise, round(n_noise / MEAN_SPAN)))
    noise, keep = _segments(n_noise, n_spans, rng), _segments(L - n_noise, n_spans, rng)
    inputs, targets, pos = [], [], 0
    for i, (k, n) in enumerate(zip(keep, noise)):
        inputs += window[pos:pos + k] + [cfg.sentinel(i)]
        targets += [cfg.sentinel(i)] + window[pos + k:pos + k + n]
        pos += k + n
    return inputs + [cfg.eos_token_id], targets + [cfg.eos_token_id]


def corrupt_batch(windows: torch.Tensor, cfg: T5Config, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) windows -> inputs (B, S) and labels (B, U) long."""
    pairs = [span_corrupt(row, cfg, rng) for row in windows.tolist()]
    return torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])


def t5_model_config(base: T5Config, tokenizer_vocab: int, eos_id: int) -> T5Config:
    """The run's config: the tokenizer's ids, then pad (= decoder start), then the sentinels, padded to 64 rows."""
    if base.n_sentinels < 1:
        raise UserError("a T5 training preset needs n_sentinels >= 1 for span corruption")
    pad = tokenizer_vocab
    vocab = -(-(tokenizer_vocab + 1 + base.n_sentinels) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    return dataclasses.replace(base, vocab_size=vocab, pad_token_id=pad, decoder_start_token_id=pad,
                               eos_token_id=eos_id).validate()


@torch.no_grad()
def evaluate_t5(model: T5, windows: torch.Tensor, cfg: T5Config, batch_size: int) -> float:
    """Mean loss over fixed windows corrupted with a fixed seed: the same validation set every time."""
    was_training = model.training
    model.eval()
    rng = np.random.default_rng(1234)
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        x, y = corrupt_batch(windows[i:i + batch_size, :-1], cfg, rng)
        total += t5_loss(model, x, None, y).item() * len(x)
        count += len(x)
    model.train(was_training)
    return total / count


def train_t5(run: RunConfig, out: Path, *, data: str | None = None, resume: bool = False,
             progress: bool = True) -> TrainResult:
    if resume:
        raise UserError("--resume is not supported for T5 runs")
    cfg: TrainConfig = run.train
    out.mkdir(parents=True, exist_ok=True)
    corpus = open_corpus(data, val_percent=cfg.val_percent)
    tok = load_or_train_tokenizer(corpus, cfg.vocab_size)
    if tok.eos_id is None:
        raise UserError("the tokenizer has no end-of-sequence token, which T5 needs")
    shards = prepare_tokens(corpus, tok, progress=progress)
    model_cfg = t5_model_config(run.model, tok.vocab_size, tok.eos_id)
    torch.manual_seed(cfg.seed)
    model = T5(model_cfg)
    optimizer = build_optimizer(model, cfg)
    batches = Batches(shards.train, cfg.batch_size, cfg.seq_len, cfg.seed)
    windows = eval_windows(shards.val, cfg.seq_len, cfg.eval_windows)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: T5, %.2fM parameters; %d training tokens", n_params / 1e6, len(shards.train))
    first_val = val_loss = evaluate_t5(model, windows, model_cfg, cfg.batch_size)
    loss_value, tokens_done, t_start = float("nan"), 0, time.perf_counter()
    bar = tqdm(total=cfg.steps, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    with open(out / METRICS_FILE, "w", encoding="utf-8") as metrics:
        for step in range(cfg.steps):
            loss_value = _step(model, optimizer, batches, step, cfg, model_cfg)
            if not np.isfinite(loss_value):
                raise UserError(f"loss became {loss_value} at step {step + 1}; lower the learning rate")
            tokens_done += cfg.batch_size * cfg.seq_len * cfg.grad_accum
            record = {"step": step + 1, "loss": loss_value, "lr": lr_at(step, cfg)}
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                val_loss = record["val_loss"] = evaluate_t5(model, windows, model_cfg, cfg.batch_size)
            metrics.write(json.dumps(record) + "\n")
            if cfg.save_every and (step + 1) % cfg.save_every == 0:
                save_t5(model, model_cfg, out, tokenizer=tok)
            bar.set_postfix(loss=f"{loss_value:.3f}", val=f"{val_loss:.3f}")
            bar.update(1)
    bar.close()
    save_t5(model, model_cfg, out, tokenizer=tok)
    elapsed = time.perf_counter() - t_start
    return TrainResult(out, cfg.steps, n_params, first_val, val_loss, loss_value, tokens_done / max(elapsed, 1e-9))


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Batches, step: int, cfg: TrainConfig,
          model_cfg: T5Config) -> float:
    set_lr(optimizer, lr_at(step, cfg))
    total = 0.0
    for micro in range(cfg.grad_accum):
        x, _ = batches.get(step, micro)
        inputs, labels = corrupt_batch(x, model_cfg, np.random.default_rng([cfg.seed, step, micro, 5]))
        loss = t5_loss(model, inputs, None, labels) / cfg.grad_accum
        loss.backward()
        total += loss.item()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def is_t5_run(config: str) -> bool:
    """Whether `--config` (a preset name or a TOML file) names a T5 model."""
    try:
        return isinstance(load_run_config(config).model, T5Config)
    except UserError:
        return False  # the decoder-only loop reports the bad config


def train_t5_from_args(args, *, distributed: bool = False) -> int:
    """`swarmlm train --config t5-tiny` (or a TOML file with `preset = "t5-tiny"`), in one process;
    `distributed` (the caller saw --swarm or torchrun) is refused."""
    if distributed:
        raise UserError("T5 presets train in one process only (no --swarm, no torchrun)")
    run = load_run_config(args.config, steps=args.steps, seed=args.seed, batch_size=args.batch_size,
                          seq_len=args.seq_len)
    out = Path(args.out or f"runs/{Path(args.config).stem}")
    result = train_t5(run, out, data=args.data, resume=args.resume, progress=not args.no_progress)
    print(f"trained {result.steps} steps of a {result.n_params / 1e6:.2f}M-parameter T5: validation loss "
          f"{result.first_val_loss:.3f} → {result.final_val_loss:.3f}; {result.tokens_per_s:.0f} tokens/s; "
          f"checkpoint in {out}")
    return 0
