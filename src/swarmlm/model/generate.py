"""Generation: sampling, the decode loop over a step function, and the `swarmlm generate` command.

Three layers, each usable alone:
- `sample_next` is pure: logits in, token ids out (randomness only from the generator given).
- `TokenLoop` is the decode loop's bookkeeping (the next step's input, sampling, stopping) and
  `stream_tokens(step, prompts, ...)` drives it. Neither knows where the model runs:
  `step(ids, key_mask) -> last logits` may run a local model with a KV cache (`local_step`),
  and the swarm client drives a `TokenLoop` itself, on its event loop.
- `generate` / `stream_generate` tie them to a local Transformer; `generate_from_args` is the CLI.

Batches of different-length prompts are left padded; each row stops at its first eos.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from swarmlm.errors import UserError
from swarmlm.model.cache import KVCache
from swarmlm.model.fastdecode import DecodeStep
from swarmlm.model.transformer import Transformer

# (new ids (B, T) long, key mask (B, T) bool or None when nothing is padding) -> logits (B, V) of each row's last token
StepFn = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sample_next(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next ids (B,). temperature 0 is greedy; top_k 0 and top_p 1 disable those filters."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]    # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(-1)
        # drop a token when the ones before it already cover top_p (the first always stays)
        drop = probs.cumsum(-1) - probs > top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def left_pad(prompts: Sequence[Sequence[int]], *, pad_id: int = 0,
             device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompts -> (ids (B, T) long, key_mask (B, T) bool, or None when all have the same length)."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.bool)
    for r, p in enumerate(prompts):
        ids[r, T - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[r, T - len(p):] = True
    if bool(mask.all()):
        return ids.to(device), None
    return ids.to(device), mask.to(device)


class TokenLoop:
    """The decode loop's bookkeeping, for a caller that runs each step itself (synchronously, as
    `stream_tokens` does, or on an event loop, as the swarm client does):

        loop = TokenLoop(prompts, max_new_tokens=...)
        while not loop.finished:
            tokens = loop.take(step(loop.ids, loop.key_mask))    # yield tokens

    `ids` / `key_mask` are the next step's input: the left-padded prompts first, then each
    row's new token (key_mask None). `take` samples from that step's last logits (B, V).
    """

    def __init__(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None,
                 eos_id: int | None = None, device: torch.device | str = "cpu"):
        self.ids, self.key_mask = left_pad(prompts, device=device)
        self.max_new_tokens = max_new_tokens
        self.sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "generator": generator}
        self.eos_id = eos_id
        self.done = [False] * len(prompts)
        self.steps = 0
        self.finished = max_new_tokens <= 0

    @property
    def last(self) -> bool:
        """The step about to run is the last one whatever it samples (its tokens end the loop)."""
        return self.steps >= self.max_new_tokens - 1

    def take(self, logits: torch.Tensor) -> list[int | None]:
        """One new token per row (None for rows that already ended at eos) from the step's logits."""
        next_ids = sample_next(logits, **self.sampling)
        tokens = next_ids.tolist()
        out = [None if d else t for d, t in zip(self.done, tokens)]
        self.done = [d or t == self.eos_id for d, t in zip(self.done, tokens)]
        self.steps += 1
        self.finished = all(self.done) or self.steps >= self.max_new_tokens
        self.ids, self.key_mask = next_ids[:, None], None
        return out


def stream_tokens(step: StepFn, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
                  top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None,
                  eos_id: int | None = None, device: torch.device | str = "cpu") -> Iterator[list[int | None]]:
    """Yield, per decoding step, one new token per row (None for rows that already ended at eos)."""
    loop = TokenLoop(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                     generator=generator, eos_id=eos_id, device=device)
    while not loop.finished:
        yield loop.take(step(loop.ids, loop.key_mask))


def local_step(model: Transformer, cache: KVCache) -> StepFn:
    """A step function over a whole local model; it computes the lm head on the last position only.
    Steps of one token per row take the lean path (fastdecode.py: the same numbers, fewer ops)."""
    fast = DecodeStep(model, cache) if DecodeStep.supports(model) else None

    @torch.inference_mode()
    def step(ids: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        if fast is not None and ids.shape[1] == 1 and key_mask is None:
            return fast(ids)
        positions = model.default_positions(ids.shape[1], cache=cache, key_mask=key_mask, device=ids.device)
        h = model.run_blocks(model.embed(ids, positions), cache=cache, positions=positions, key_mask=key_mask)
        return model.head(h[:, -1:])[:, 0]  # (B, V)
    return step


def _as_batch(prompt_ids: Sequence[int] | Sequence[Sequence[int]]) -> tuple[list[list[int]], bool]:
    single = len(prompt_ids) > 0 and not isinstance(prompt_ids[0], (list, tuple))
    prompts = [list(prompt_ids)] if single else [list(p) for p in prompt_ids]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("every prompt needs at least one token")
    return prompts, single


def check_context(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> int:
    """Raise UserError if a prompt does not fit the context; return max_new_tokens capped to what fits."""
    limit = model.cfg.context_len
    longest = max(len(p) for p in prompts)
    if longest > limit:
        raise UserError(f"prompt is {longest} tokens, longer than the model's context of {limit}")
    if any(t < 0 or t >= model.cfg.vocab_size for p in prompts for t in p):
        raise UserError(f"prompt has token ids outside the vocabulary (0..{model.cfg.vocab_size - 1})")
    return max(0, min(max_new_tokens, limit - longest))


def stream_generate(model: Transformer, prompt_ids: Sequence[int] | Sequence[Sequence[int]], *, max_new_tokens: int,
                    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                    eos_id: int | None = None) -> Iterator[list[int | None]]:
    """Per-step tokens of a local model (see stream_tokens), with a preallocated KV cache."""
    prompts, _ = _as_batch(prompt_ids)
    max_new_tokens = check_context(model, prompts, max_new_tokens)
    param = next(model.parameters())
    generator = torch.Generator(device=param.device).manual_seed(seed)
    cache = KVCache.empty(model.cfg, len(prompts), max(len(p) for p in prompts) + max_new_tokens,
                          dtype=param.dtype, device=param.device)
    yield from stream_tokens(local_step(model, cache), prompts, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                             eos_id=eos_id, device=param.device)


def generate(model: Transformer, prompt_ids: Sequence[int] | Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             eos_id: int | None = None) -> list[int] | list[list[int]]:
    """Generated tokens (prompt excluded, ending at the first eos) for one prompt, or a list per prompt."""
    prompts, single = _as_batch(prompt_ids)
    rows: list[list[int]] = [[] for _ in prompts]
    for tokens in stream_generate(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_k=top_k, top_p=top_p, seed=seed, eos_id=eos_id):
        for row, t in zip(rows, tokens):
            if t is not None:
                row.append(t)
    return rows[0] if single else rows


# ---- the CLI ---------------------------------------------------------------------------------

def check_sampling_args(args) -> None:
    """The CLI's sampling options, checked before any model is loaded."""
    if args.max_new_tokens < 0 or args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1:
        raise UserError("need --max-new-tokens >= 0, --temperature >= 0, --top-k >= 0 and 0 < --top-p <= 1")


@dataclass(frozen=True)
class Emitted:
    output_ids: list[int]      # generated ids, ending at the first eos if one was generated
    text: str                  # their text, eos excluded
    tokens_per_s: float        # decoding rate after the first token

    def report(self, prompt_ids: list[int], *, as_json: bool, how: str = "", **extra: Any) -> None:
        """What `generate` prints last: with --json the one object of DESIGN.md (and `extra`), else
        a line on stderr with the count, the rate and `how` ("through the swarm, ...")."""
        if as_json:
            print(json.dumps({"prompt_ids": prompt_ids, "output_ids": self.output_ids, "text": self.text,
                              "tokens_per_s": round(self.tokens_per_s, 3), **extra}))
        else:
            print(f"[{len(self.output_ids)} tokens, {self.tokens_per_s:.1f} tokens/s{how}]", file=sys.stderr)


def decode_rate(times: list[float]) -> float:
    """Tokens per second after the first token, from each token's arrival time."""
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0


def emit_generation(steps: Iterable[list[int | None]], tokenizer, eos_id: int | None, *, stream: bool) -> Emitted:
    """Consume one row of `stream_tokens`-style steps; with `stream`, write text to stdout as it decodes.

    Shared by local and swarm generation, so `--json` means the same thing for both."""
    output_ids: list[int] = []
    times: list[float] = []

    def tokens() -> Iterator[int]:
        for step in steps:
            t = step[0]
            if t is None:
                return
            output_ids.append(t)
            times.append(time.perf_counter())
            if t != eos_id:
                yield t

    if not stream:
        text = tokenizer.decode(list(tokens()))
    else:
        pieces = []
        for piece in tokenizer.decode_stream(tokens()):
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        text = "".join(pieces)
    return Emitted(output_ids, text, decode_rate(times))


def generate_from_args(args) -> int:
    """`swarmlm generate MODEL_DIR --prompt ...`: stream text to stdout, or print one JSON object with --json."""
    from swarmlm.model.hf import load_config, load_model
    from swarmlm.model.tokenizer import Tokenizer

    from swarmlm.model.quant import check_quantizable, parse_scheme, quantize_model

    cfg = load_config(args.model)
    scheme = parse_scheme(getattr(args, "quantize", None))
    check_quantizable(cfg, scheme)
    tokenizer = Tokenizer.load(args.model)
    prompt_ids = tokenizer.encode(args.prompt)
    if not prompt_ids:
        raise UserError("the prompt encodes to no tokens")
    if len(prompt_ids) > cfg.context_len:
        raise UserError(f"prompt is {len(prompt_ids)} tokens, longer than the model's context of {cfg.context_len}")
    check_sampling_args(args)
    model, cfg = load_model(args.model, dtype=DTYPES[getattr(args, "dtype", "float32")])
    quantize_model(model, scheme)
    eos_id = cfg.eos_token_id if cfg.eos_token_id is not None else tokenizer.eos_id
    steps = stream_generate(model, prompt_ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed, eos_id=eos_id)
    emit_generation(steps, tokenizer, eos_id, stream=not args.json).report(prompt_ids, as_json=args.json)
    return 0
