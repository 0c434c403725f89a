"""Perplexity of a checkpoint on a text, and the `swarmlm eval` command.

How the text is cut (the same rule the tests apply to transformers): the whole text is
tokenized once, with no BOS or EOS added, and cut into consecutive non-overlapping windows of
`window` tokens (default: the model's context); the last, shorter window counts if it has at
least two tokens. Each window is an independent forward from position 0, and predicts its
tokens 2..n from the ones before them, so a text of N tokens in W windows scores N - W tokens.

    nll        = mean over those tokens of -log p(token | its window's earlier tokens), in nats
    perplexity = exp(nll)

Log-probabilities are taken in float32 (log_softmax of the logits), summed in float64.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from swarmlm.errors import UserError


@dataclass(frozen=True)
class Perplexity:
    tokens: int          # tokens scored (every token but the first of each window)
    nll: float           # mean negative log-likelihood per scored token, nats
    perplexity: float    # exp(nll)


def windows(ids: Sequence[int], window: int) -> list[list[int]]:
    """Consecutive non-overlapping windows of `window` tokens; a last one of fewer than 2 is dropped."""
    if window < 2:
        raise UserError(f"the window must be at least 2 tokens, got {window}")
    out = [list(ids[i:i + window]) for i in range(0, len(ids), window)]
    return [w for w in out if len(w) >= 2]


@torch.inference_mode()
def perplexity(model, ids: Sequence[int], *, window: int, batch_size: int = 4) -> Perplexity:
    """Score `ids` with `model` (token ids (B, T) -> logits (B, T, V)) window by window."""
    chunks = windows(ids, window)
    if not chunks:
        raise UserError("the text has fewer than 2 tokens: nothing to score")
    total, count = 0.0, 0
    by_len: dict[int, list[list[int]]] = {}
    for c in chunks:
        by_len.setdefault(len(c), []).append(c)
    for length, group in sorted(by_len.items()):
        for i in range(0, len(group), batch_size):
            x = torch.tensor(group[i:i + batch_size], dtype=torch.long)        # (B, T)
            logits = model(x).float()                                          # (B, T, V)
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            picked = logp.gather(-1, x[:, 1:, None])[..., 0]                   # (B, T-1)
            total -= float(picked.double().sum())
            count += picked.numel()
    nll = total / count
    return Perplexity(tokens=count, nll=nll, perplexity=math.exp(nll))


def eval_from_args(args) -> int:
    """`swarmlm eval MODEL_DIR --data PATH [--quantize Q] [--window N] [--json]`."""
    from swarmlm.model.hf import load_config, load_model
    from swarmlm.model.quant import check_quantizable, parse_scheme, quantize_model
    from swarmlm.model.tokenizer import Tokenizer

    scheme = parse_scheme(args.quantize)
    cfg = load_config(args.model)
    check_quantizable(cfg, scheme)
    path = Path(args.data)
    if not path.is_file():
        raise UserError(f"--data {args.data}: not a file")
    text = path.read_text(encoding="utf-8", errors="replace")
    window = args.window or cfg.context_len
    if window > cfg.context_len:
        raise UserError(f"--window {window} is longer than the model's context of {cfg.context_len}")
    if args.batch_size <= 0:
        raise UserError("--batch-size must be positive")
    ids = Tokenizer.load(args.model).encode(text)
    model, _ = load_model(args.model)
    quantize_model(model, scheme)
    result = perplexity(model, ids, window=window, batch_size=args.batch_size)
    if args.json:
        print(json.dumps({**asdict(result), "quantization": scheme.name, "window": window}))
    else:
        print(f"perplexity {result.perplexity:.4f} (nll {result.nll:.5f} nats/token over {result.tokens} tokens, "
              f"windows of {window}, quantization {scheme.name})")
        sys.stdout.flush()
    return 0
