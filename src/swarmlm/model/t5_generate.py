"""Generation with a T5 model: encode once, then decode token by token over a T5Cache.

Reuses the decoder-only loop's bookkeeping (`TokenLoop` via `stream_tokens`, `sample_next`,
`emit_generation`): every row's decoder starts from `decoder_start_token_id`, and a step
function runs the decoder on the new token. Prompts of different lengths are RIGHT padded
(T5's convention; relative positions make either side give the same numbers) with a key
mask, so a padded row computes exactly what it would alone. Knows nothing of files
beyond the CLI entry point.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from swarmlm.errors import UserError
from swarmlm.model.generate import DTYPES, StepFn, check_sampling_args, emit_generation, stream_tokens
from swarmlm.model.t5 import T5, T5Cache


def right_pad(prompts: Sequence[Sequence[int]], *, pad_id: int,
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompts -> (ids (B, S) long, key_mask (B, S) bool or None when all have the same length)."""
    S = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), S), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), S, dtype=torch.bool)
    for r, p in enumerate(prompts):
        ids[r, :len(p)] = torch.as_tensor(list(p), dtype=torch.long)
        mask[r, :len(p)] = True
    return ids.to(device), (None if bool(mask.all()) else mask.to(device))


def t5_step(model: T5, cache: T5Cache) -> StepFn:
    """A step function for `stream_tokens`: new decoder ids (B, T) -> last logits (B, V)."""
    @torch.inference_mode()
    def step(ids: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        return model.decode(ids, cross=cache.cross, enc_mask=cache.enc_mask, cache=cache)[:, -1]  # (B, V)
    return step


def _check(model: T5, prompts: list[list[int]]) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    if longest > model.cfg.max_seq_len:
        raise UserError(f"prompt is {longest} tokens, longer than the model's context of {model.cfg.max_seq_len}")
    if any(t < 0 or t >= model.cfg.vocab_size for p in prompts for t in p):
        raise UserError(f"prompt has token ids outside the vocabulary (0..{model.cfg.vocab_size - 1})")


def stream_t5(model: T5, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
              top_k: int = 0, top_p: float = 1.0, seed: int = 0,
              eos_id: int | None = -1) -> Iterator[list[int | None]]:
    """Per-step tokens (one per row, None once a row ended). eos_id -1: the config's eos."""
    prompts = [list(p) for p in prompts]
    _check(model, prompts)
    max_new_tokens = max(0, min(max_new_tokens, model.cfg.max_seq_len))
    eos_id = model.cfg.eos_token_id if eos_id == -1 else eos_id
    param = next(model.parameters())
    ids, mask = right_pad(prompts, pad_id=model.cfg.pad_token_id, device=param.device)
    with torch.inference_mode():
        cache = model.new_cache(model.encode(ids, mask), mask, max(1, max_new_tokens))
    generator = torch.Generator(device=param.device).manual_seed(seed)
    start = [[model.cfg.decoder_start_token_id]] * len(prompts)
    yield from stream_tokens(t5_step(model, cache), start, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_k=top_k, top_p=top_p, generator=generator, eos_id=eos_id, device=param.device)


def generate_t5(model: T5, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
                top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_id: int | None = -1) -> list[list[int]]:
    """Generated ids per prompt (the decoder start excluded), each ending at its first eos."""
    rows: list[list[int]] = [[] for _ in prompts]
    for tokens in stream_t5(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, seed=seed, eos_id=eos_id):
        for row, t in zip(rows, tokens):
            if t is not None:
                row.append(t)
    return rows


def t5_generate_from_args(args) -> int:
    """`swarmlm generate T5_DIR --prompt ...`: the prompt (plus eos, as T5's tokenizer adds it) is encoded once."""
    from swarmlm.model.t5_hf import load_t5, load_t5_config
    from swarmlm.model.tokenizer import Tokenizer

    if getattr(args, "swarm", False):
        raise UserError("T5 (encoder-decoder) checkpoints run locally only; drop --swarm")
    cfg = load_t5_config(args.model)
    tokenizer = Tokenizer.load(args.model)
    prompt_ids = tokenizer.encode(args.prompt)
    if not prompt_ids:
        raise UserError("the prompt encodes to no tokens")
    if prompt_ids[-1] != cfg.eos_token_id:
        prompt_ids.append(cfg.eos_token_id)
    if len(prompt_ids) > cfg.max_seq_len:
        raise UserError(f"prompt is {len(prompt_ids)} tokens, longer than the model's context of {cfg.max_seq_len}")
    check_sampling_args(args)
    model, cfg = load_t5(args.model, dtype=DTYPES[getattr(args, "dtype", "float32")])
    steps = stream_t5(model, [prompt_ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    emit_generation(steps, tokenizer, cfg.eos_token_id, stream=not args.json).report(prompt_ids, as_json=args.json)
    return 0
