"""Parameter-efficient fine-tuning through the swarm: the client trains, the servers stay frozen.

Trainable parameters live on the client only (`Adapters`):
- prompt tuning: P embeddings (P, D) put before every sequence;
- deep prompts (P-tuning v2): (n_layers, P, D) added to those P positions before every block;
  the servers run them and send their gradients back;
- LoRA (model/lora.py) on the client's own layers (the lm head): y = W x + (alpha / r) * B A x, B starting at 0.

`lm_loss` is the one definition of the training loss, written over a `run_blocks(h, prompts=)`
callable, so a step through the swarm (`RemoteModel.run_blocks`, gradients from the servers'
backward) and the same step run locally (`local_blocks`) compute the same thing, and their
gradients can be compared. `finetune` is the loop (AdamW over the adapters only), and
`finetune_from_args` the `swarmlm finetune` command. Knows nothing of peers.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from swarmlm.errors import DataError, UserError
from swarmlm.log import get_logger
from swarmlm.model.config import ModelConfig
from swarmlm.model.lora import LoRALinear
from swarmlm.model.transformer import Transformer
from swarmlm.swarm.blocks import run_span

logger = get_logger(__name__)

ADAPTERS_FILE = "adapters.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
RunBlocks = Callable[..., torch.Tensor]   # (h (B, T, D), *, prompts (n_layers, 1, P, D) | None) -> (B, T, D)


@dataclass(frozen=True)
class TuneConfig:
    prompt_len: int = 16          # P trainable prompt positions before every sequence (0: none)
    deep_prompts: bool = False    # also train prompts added before every block (needs prompt_len > 0)
    lora_rank: int = 0            # LoRA rank on the lm head (0: none)
    lora_alpha: float = 16.0      # LoRA scale numerator: the update is (alpha / rank) * B A
    lr: float = 1e-2              # AdamW learning rate
    steps: int = 30               # optimizer steps
    batch_size: int = 8           # sequences per step
    seq_len: int = 128            # tokens per sequence (prompts not counted)
    seed: int = 0                 # initialisation and batch order

    def check(self) -> "TuneConfig":
        if self.prompt_len < 0 or self.lora_rank < 0:
            raise UserError("--prompt-len and --lora-rank must not be negative")
        if self.prompt_len == 0 and self.lora_rank == 0:
            raise UserError("nothing to train: give --prompt-len > 0 or --lora-rank > 0")
        if self.deep_prompts and self.prompt_len == 0:
            raise UserError("--deep-prompts needs --prompt-len > 0")
        if self.steps <= 0 or self.batch_size <= 0 or self.seq_len < 2 or not self.lr > 0:
            raise UserError("need --steps > 0, --batch-size > 0, --seq-len >= 2 and --lr > 0")
        return self


class Adapters(nn.Module):
    """The client's trainable parameters for one model."""

    def __init__(self, cfg: ModelConfig, tune: TuneConfig):
        super().__init__()
        tune.check()
        g = torch.Generator().manual_seed(tune.seed)
        P, D = tune.prompt_len, cfg.dim
        self.tune = tune
        self.prompts = nn.Parameter(torch.randn(P, D, generator=g) * 0.02) if P else None   # (P, D)
        self.deep = nn.Parameter(torch.zeros(cfg.n_layers, P, D)) if tune.deep_prompts else None  # (L, P, D)
        self.head_lora: LoRALinear | None = None
        self._generator = g

    @property
    def prompt_len(self) -> int:
        return self.tune.prompt_len

    def attach(self, local: Transformer) -> None:
        """Wrap `local`'s lm head with this LoRA (once)."""
        if self.tune.lora_rank and self.head_lora is None:
            if local.output is None:
                raise UserError("LoRA on the head needs a model that holds its lm head")
            self.head_lora = LoRALinear(local.output, self.tune.lora_rank, self.tune.lora_alpha, self._generator)

    def head(self, local: Transformer, h: torch.Tensor) -> torch.Tensor:
        """Final norm and lm head (with LoRA when attached): (B, T, D) -> (B, T, V)."""
        if self.head_lora is None:
            return local.head(h)
        if local.norm is not None:
            h = local.norm(h)
        return self.head_lora(h)

    def trainable(self) -> dict[str, nn.Parameter]:
        out = {}
        if self.prompts is not None:
            out["prompts"] = self.prompts
        if self.deep is not None:
            out["deep_prompts"] = self.deep
        if self.head_lora is not None:
            out["head.lora_a"] = self.head_lora.lora_a
            out["head.lora_b"] = self.head_lora.lora_b
        return out

    def save(self, out_dir: str | Path) -> None:
        from safetensors.torch import save_file
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in self.trainable().items()}, str(out / ADAPTERS_FILE))
        (out / ADAPTER_CONFIG_FILE).write_text(json.dumps(asdict(self.tune), indent=2))


def local_blocks(model: Transformer) -> RunBlocks:
    """Every block of a local model as a `run_blocks` callable (the reference for the swarm)."""
    def run(h: torch.Tensor, *, prompts: torch.Tensor | None = None) -> torch.Tensor:
        return run_span(model, h, 0, model.cfg.n_layers, prompts=prompts)
    return run


def lm_loss(local: Transformer, run_blocks: RunBlocks, adapters: Adapters, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of ids (B, T) with the prompts in front; `local` holds embeddings and head."""
    B, T = ids.shape
    P = adapters.prompt_len
    positions = torch.arange(P, P + T, device=ids.device)[None]           # tokens come after the prompts
    h = local.embed(ids, positions)                                        # (B, T, D)
    if adapters.prompts is not None:
        h = torch.cat([adapters.prompts.expand(B, P, -1), h], dim=1)       # (B, P+T, D)
    deep = adapters.deep[:, None] if adapters.deep is not None else None   # (L, 1, P, D)
    h = run_blocks(h, prompts=deep)                                        # (B, P+T, D)
    logits = adapters.head(local, h[:, P:])                                # (B, T, V)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def batch_at(tokens: torch.Tensor, step: int, *, batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
    """The step's batch (B, T) of random windows of `tokens`: a pure function of (step, seed)."""
    n = tokens.numel() - seq_len
    if n < 1:
        raise DataError(f"the data has {tokens.numel()} tokens; --seq-len {seq_len} needs more")
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, n, (batch_size,), generator=g)
    return torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])   # (B, T)


def finetune(local: Transformer, run_blocks: RunBlocks, adapters: Adapters, tokens: torch.Tensor, *,
             on_step: Callable[[dict[str, Any]], None] = lambda m: None) -> list[float]:
    """Train the adapters for `adapters.tune.steps` steps; returns the loss of each step."""
    tune = adapters.tune
    adapters.attach(local)
    opt = torch.optim.AdamW(list(adapters.trainable().values()), lr=tune.lr, weight_decay=0.0)
    losses = []
    for step in range(tune.steps):
        t0 = time.perf_counter()
        ids = batch_at(tokens, step, batch_size=tune.batch_size, seq_len=tune.seq_len, seed=tune.seed)
        loss = lm_loss(local, run_blocks, adapters, ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        on_step({"step": step + 1, "loss": losses[-1], "step_s": round(time.perf_counter() - t0, 4)})
    return losses


# ---- the command -------------------------------------------------------------------------------------

def _read_tokens(model_dir: Path, data: str) -> torch.Tensor:
    from swarmlm.model.tokenizer import Tokenizer
    path = Path(data)
    if not path.is_file():
        raise DataError(f"--data {data}: no such file")
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise DataError(f"--data {data}: {e}") from None
    ids = Tokenizer.load(model_dir).encode(text)
    if not ids:
        raise DataError(f"--data {data} holds no text")
    return torch.tensor(ids, dtype=torch.long)


def finetune_from_args(args: Any) -> int:
    """`swarmlm finetune MODEL [--swarm --initial-peers ...] --data FILE --out DIR`."""
    tune = TuneConfig(prompt_len=args.prompt_len, deep_prompts=args.deep_prompts, lora_rank=args.lora_rank,
                      lr=args.lr, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                      seed=args.seed).check()
    from swarmlm.model.quant import parse_scheme, quantize_model
    scheme = parse_scheme(getattr(args, "quantize", None))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = open(out / "metrics.jsonl", "w")

    def log_step(m: dict[str, Any]) -> None:
        metrics.write(json.dumps(m) + "\n")
        metrics.flush()
        print(f"step {m['step']}: loss {m['loss']:.4f}", flush=True)

    try:
        if args.swarm:
            from swarmlm.swarm.client.model import RemoteModel
            if not args.initial_peers:
                raise UserError("--swarm needs --initial-peers")
            with RemoteModel.connect(args.model, initial_peers=args.initial_peers,
                                     connect_timeout_s=args.connect_timeout,
                                     quantization=getattr(args, "quantize", None)) as model:
                if tune.prompt_len + tune.seq_len > model.cfg.context_len:
                    raise UserError(f"--prompt-len + --seq-len exceeds the model's context of {model.cfg.context_len}")
                tokens = _read_tokens(model.source_dir, args.data)
                adapters = Adapters(model.cfg, tune)
                finetune(model.local, model.run_blocks, adapters, tokens, on_step=log_step)
        else:
            from swarmlm.model.hf import load_model
            local, cfg = load_model(args.model)
            local.requires_grad_(False)
            quantize_model(local, scheme)
            if tune.prompt_len + tune.seq_len > cfg.context_len:
                raise UserError(f"--prompt-len + --seq-len exceeds the model's context of {cfg.context_len}")
            tokens = _read_tokens(Path(args.model), args.data)
            adapters = Adapters(cfg, tune)
            finetune(local, local_blocks(local), adapters, tokens, on_step=log_step)
    finally:
        metrics.close()
    adapters.save(out)
    print(f"adapters saved to {out}", flush=True)
    return 0

