"""The single-process training loop: `swarmlm train`.

corpus → tokenizer → cached token shards → model → AdamW with warmup + cosine, gradient
accumulation and clipping → `metrics.jsonl` one line per step, validation every N steps,
atomic HF-format checkpoints with the trainer state beside them, exact resume (weights,
optimizer, step; data windows and the schedule are functions of the step). torchrun and the
swarm reuse `prepare_data`, `lm_loss` and `evaluate` from here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from swarmlm.data.corpus import open_corpus
from swarmlm.data.shards import Batches, TokenShards, eval_windows, load_or_train_tokenizer, prepare_tokens
from swarmlm.errors import CheckpointError, UserError
from swarmlm.log import get_logger
from swarmlm.model.config import ModelConfig
from swarmlm.model.hf import load_model, save_model
from swarmlm.model.tokenizer import Tokenizer
from swarmlm.model.transformer import Transformer
from swarmlm.train.config import RunConfig, TrainConfig, load_run_config
from swarmlm.train.optim import build_optimizer, lr_at, set_lr

log = get_logger(__name__)
STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"
VOCAB_MULTIPLE = 64


@dataclass(frozen=True)
class Prepared:
    tokenizer: Tokenizer
    shards: TokenShards
    model_cfg: ModelConfig          # the run's model config with the tokenizer's vocabulary


@dataclass(frozen=True)
class TrainResult:
    out_dir: Path
    steps: int
    n_params: int
    first_val_loss: float | None    # validation loss before the first step of this run
    final_val_loss: float
    final_loss: float
    tokens_per_s: float


def prepare_data(run: RunConfig, data: str | None, *, tokenizer_dir: Path | None = None,
                 progress: bool = True) -> Prepared:
    """Open the corpus, get a tokenizer (from `tokenizer_dir` if it has one) and the token shards."""
    if not isinstance(run.model, ModelConfig):
        raise UserError("T5 presets train in one process only (no --swarm, no torchrun)")
    corpus = open_corpus(data, val_percent=run.train.val_percent)
    if tokenizer_dir is not None and (tokenizer_dir / "tokenizer.json").is_file():
        tok = Tokenizer.load(tokenizer_dir)
    else:
        tok = load_or_train_tokenizer(corpus, run.train.vocab_size)
    shards = prepare_tokens(corpus, tok, progress=progress)
    # the embedding is padded to a multiple of 64 rows (Megatron's rule) so tensor parallel can
    # split it whatever size the tokenizer reached; the extra rows are never targets
    vocab = -(-tok.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    cfg = dataclasses.replace(run.model, vocab_size=vocab, eos_token_id=tok.eos_id,
                              bos_token_id=tok.eos_id).validate()
    return Prepared(tok, shards, cfg)


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of (B, T) inputs against (B, T) targets."""
    logits = model(x)                                            # (B, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))


@torch.no_grad()
def evaluate(model: nn.Module, windows: torch.Tensor, batch_size: int) -> float:
    """Mean loss over fixed (N, T+1) validation windows."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        w = windows[i:i + batch_size]
        total += lm_loss(model, w[:, :-1], w[:, 1:]).item() * len(w)
        count += len(w)
    model.train(was_training)
    return total / count


def train(run: RunConfig, out: Path, *, data: str | None = None, resume: bool = False, progress: bool = True,
          stop_at: int | None = None) -> TrainResult:
    """Train `run` into `out`; with `resume`, continue exactly from the checkpoint there.

    `stop_at` ends the run early after that step (as an interruption would), saving a checkpoint.
    """
    cfg = run.train
    out.mkdir(parents=True, exist_ok=True)
    prep = prepare_data(run, data, tokenizer_dir=out if resume else None, progress=progress)
    torch.manual_seed(cfg.seed)
    model = Transformer(prep.model_cfg)
    optimizer = build_optimizer(model, cfg)
    start = _restore(out, model, optimizer, prep.model_cfg) if resume else 0
    keep_metrics_up_to(out / METRICS_FILE, start)
    batches = Batches(prep.shards.train, cfg.batch_size, cfg.seq_len, cfg.seed)
    windows = eval_windows(prep.shards.val, cfg.seq_len, cfg.eval_windows)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %s, %.2fM parameters; %d training tokens", prep.model_cfg.architecture, n_params / 1e6,
             len(prep.shards.train))

    first_val = evaluate(model, windows, cfg.batch_size) if start == 0 else None
    val_loss, loss_value = first_val, float("nan")
    end = min(cfg.steps, stop_at) if stop_at is not None else cfg.steps
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    step = start
    t_start, tokens_done = time.perf_counter(), 0
    try:
        with open(out / METRICS_FILE, "a", encoding="utf-8") as metrics:
            for step in range(start, end):
                t0 = time.perf_counter()
                loss_value, grad_norm = _train_step(model, optimizer, batches, step, cfg)
                if not torch.isfinite(torch.tensor(loss_value)):
                    raise UserError(f"loss became {loss_value} at step {step + 1}; lower the learning rate")
                tokens_done += tokens_per_step
                record = {"step": step + 1, "loss": loss_value, "lr": lr_at(step, cfg), "grad_norm": grad_norm,
                          "tokens_per_s": tokens_per_step / (time.perf_counter() - t0)}
                if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                    val_loss = record["val_loss"] = evaluate(model, windows, cfg.batch_size)
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < end:
                    save_checkpoint(out, model, prep, optimizer, step + 1, run)
                bar.set_postfix(loss=f"{loss_value:.3f}", val=f"{val_loss:.3f}" if val_loss else "-",
                                tok_s=f"{tokens_done / (time.perf_counter() - t_start):.0f}")
                bar.update(1)
            step = end
    except KeyboardInterrupt:
        save_checkpoint(out, model, prep, optimizer, step, run)
        bar.close()
        raise
    bar.close()
    if val_loss is None or (end != cfg.steps):
        val_loss = evaluate(model, windows, cfg.batch_size)
    save_checkpoint(out, model, prep, optimizer, end, run)
    elapsed = time.perf_counter() - t_start
    return TrainResult(out, end, n_params, first_val, val_loss, loss_value, tokens_done / max(elapsed, 1e-9))


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Batches, step: int,
                cfg: TrainConfig) -> tuple[float, float]:
    set_lr(optimizer, lr_at(step, cfg))
    total = 0.0
    for micro in range(cfg.grad_accum):
        x, y = batches.get(step, micro)
        loss = lm_loss(model, x, y) / cfg.grad_accum
        loss.backward()
        total += loss.item()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf")))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total, grad_norm


# ---- checkpoints ------------------------------------------------------------------------------

def save_checkpoint(out: Path, model: nn.Module, prep: Prepared, optimizer: torch.optim.Optimizer, step: int,
                    run: RunConfig) -> None:
    """HF-format weights, config and tokenizer in `out`, then the trainer state, each file atomic.

    The trainer state names a digest of the weights it belongs to, so a save cut short between
    the two is detected on resume instead of silently mixing steps.
    """
    save_model(model, prep.model_cfg, out, tokenizer=prep.tokenizer)
    state = {"step": step, "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
             "weights_digest": _weights_digest(out), "train_config": json.dumps(dataclasses.asdict(run.train))}
    tmp = out / f".{STATE_FILE}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, out / STATE_FILE)


def _restore(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: ModelConfig) -> int:
    path = out / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"--resume: no {STATE_FILE} in {out}")
    try:
        state = torch.load(path, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"--resume: {path} is unreadable ({type(e).__name__})") from None
    if state.get("weights_digest") != _weights_digest(out):
        raise CheckpointError(f"--resume: weights in {out} do not match {STATE_FILE} (a save was interrupted)")
    saved, saved_cfg = load_model(out)
    if dataclasses.replace(saved_cfg, architecture=cfg.architecture) != cfg:
        raise CheckpointError(f"--resume: the checkpoint in {out} has a different model config than this run")
    model.load_state_dict(saved.state_dict())
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return int(state["step"])


def _weights_digest(out: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(out.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def keep_metrics_up_to(path: Path, last_step: int) -> None:
    """Keep the metric lines of steps ≤ `last_step`: a resumed run rewrites what came after."""
    if not path.exists():
        return
    kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= last_step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(ln + "\n" for ln in kept))
    os.replace(tmp, path)


# ---- CLI --------------------------------------------------------------------------------------

def train_from_args(args) -> int:
    """`swarmlm train` in one process (cli.py sends torchrun and `--swarm` runs elsewhere)."""
    run = load_run_config(args.config, steps=args.steps, seed=args.seed, batch_size=args.batch_size,
                          seq_len=args.seq_len)
    out = Path(args.out or f"runs/{Path(args.config).stem}")
    result = train(run, out, data=args.data, resume=args.resume, progress=not args.no_progress)
    first = f"{result.first_val_loss:.3f} → " if result.first_val_loss is not None else ""
    print(f"trained {result.steps} steps of a {result.n_params / 1e6:.2f}M-parameter model: "
          f"validation loss {first}{result.final_val_loss:.3f}; {result.tokens_per_s:.0f} tokens/s; "
          f"checkpoint in {out}")
    return 0
