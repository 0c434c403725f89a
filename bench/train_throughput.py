"""Training throughput of a preset and its model FLOPs utilization (MFU) on this machine.

Both sides in one run: the machine's float32 matmul peak (median of square matmuls), then
training steps of the preset on synthetic tokens. MFU = model FLOPs per second / peak, with
model FLOPs = 6 * parameters * tokens + 12 * layers * dim * seq_len * tokens (attention),
the PaLM appendix B count. Prints one JSON line per result.

    python bench/train_throughput.py [--preset small] [--steps 6] [--batch-size 8] [--seq-len 256]
"""

import argparse
import json
import statistics
import time

import torch

from swarmlm.model.config import PRESETS
from swarmlm.model.transformer import Transformer
from swarmlm.train.config import TrainConfig
from swarmlm.train.loop import lm_loss
from swarmlm.train.optim import build_optimizer


def matmul_peak_flops(n: int = 2048, repeats: int = 7) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times)


def train_tokens_per_s(preset: str, steps: int, batch: int, seq: int) -> tuple[float, float]:
    cfg = PRESETS[preset]
    torch.manual_seed(0)
    model = Transformer(cfg)
    opt = build_optimizer(model, TrainConfig())
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        loss = lm_loss(model, x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    n_params = sum(p.numel() for p in model.parameters())
    tokens = batch * seq
    flops_per_token = 6 * n_params + 12 * cfg.n_layers * cfg.dim * seq
    return tokens / statistics.median(times[1:]), flops_per_token


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    a = ap.parse_args()
    peak = matmul_peak_flops()
    tok_s, flops_per_token = train_tokens_per_s(a.preset, a.steps, a.batch_size, a.seq_len)
    peak_after = matmul_peak_flops()
    peak = max(peak, peak_after)   # the machine is shared: take the better of two peak readings
    for name, value, unit in [("matmul_peak_fp32", peak / 1e9, "GFLOP/s"),
                              (f"train_{a.preset}_tokens_per_s", tok_s, "tokens/s"),
                              (f"train_{a.preset}_mfu", tok_s * flops_per_token / peak, "ratio")]:
        print(json.dumps({"name": name, "value": round(value, 4), "unit": unit}))


if __name__ == "__main__":
    main()
