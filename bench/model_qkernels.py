"""One-row quantized products: model/qkernels.py's kernels against torch's own, at a model's shapes.

For each shape (the `small` preset's q/k/v, o, gate/up, down and lm head by default) a set of
different weight matrices, together larger than the CPU's caches (`--megabytes`), is cycled
through, so every product reads its weights from memory as a decode step does. Sides, all in
one run, interleaved, medians of `--repeats`:

- `torch-fp32`: `torch.mm` with the float weight (what an unquantized Linear runs);
- `torch-int8` / `torch-int4`: torch's weight-only kernels with bfloat16 activations
  (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`, group 32);
- `swarmlm-int8` / `swarmlm-int4`: `qkernels.int8_matmul` / `int4_matmul` (the compiled
  AVX512-VNNI kernels where they build, else the torch reference: a line says which).

Prints microseconds per product, the weights' bytes per second, and the ratios ours / torch's.

    python bench/model_qkernels.py [--threads 1] [--repeats 5] [--megabytes 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from swarmlm.model import qkernels

SHAPES = {"qkv": (1024, 512), "o": (512, 512), "gate_up": (2816, 512), "down": (512, 1408), "head": (8192, 512)}


def _sides(N: int, K: int, copies: int) -> dict:
    """{side: (function running one product on matrix i, weight bytes per product)}."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, K, generator=gen)
    xb = x.to(torch.bfloat16)
    fp, t8, t4, o8, o4 = [], [], [], [], []
    for _ in range(copies):
        w = torch.randn(N, K, generator=gen)
        fp.append(w.t())
        q8 = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=gen)
        t8.append((q8, torch.rand(N, generator=gen).to(torch.bfloat16)))
        o8.append((qkernels.pack_int8(q8), torch.rand(N, generator=gen), q8.sum(1, dtype=torch.int32)))
        q4 = torch.randint(0, 16, (N, K), dtype=torch.int32, generator=gen)
        t4.append((torch._convert_weight_to_int4pack_for_cpu(q4, 1),
                   torch.rand(K // 32, N, 2, generator=gen).to(torch.bfloat16)))
        sz = torch.rand(N // 16, K // 32, 16, generator=gen).to(torch.bfloat16)
        o4.append((qkernels.pack_int4(q4), sz, sz.clone()))
    return {
        "torch-fp32": (lambda i: torch.mm(x, fp[i]), 4 * N * K),
        "torch-int8": (lambda i: torch._weight_int8pack_mm(xb, *t8[i]), N * K),
        "swarmlm-int8": (lambda i: qkernels.int8_matmul(x, *o8[i]), N * K),
        "torch-int4": (lambda i: torch._weight_int4pack_mm_for_cpu(xb, t4[i][0], 32, t4[i][1]), N * K // 2),
        "swarmlm-int4": (lambda i: qkernels.int4_matmul(x, *o4[i], 32), N * K // 2),
    }


def _time(fn, copies: int, rounds: int) -> float:
    start = time.perf_counter()
    for _ in range(rounds):
        for i in range(copies):
            fn(i)
    return (time.perf_counter() - start) / (rounds * copies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--megabytes", type=int, default=64, help="int8 weights cycled through per shape")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps({"name": "model_qkernels.path", "path": qkernels.describe(), "threads": args.threads}))
    with torch.inference_mode():
        for name, (N, K) in SHAPES.items():
            copies = max(2, args.megabytes * 2**20 // (N * K))
            sides = _sides(N, K, copies)
            rounds = max(1, 2000 // copies)
            for fn, _ in sides.values():                       # warm-up
                _time(fn, copies, 1)
            runs: dict[str, list[float]] = {k: [] for k in sides}
            for _ in range(args.repeats):
                for k, (fn, _) in sides.items():
                    runs[k].append(_time(fn, copies, rounds))
            med = {k: statistics.median(v) for k, v in runs.items()}
            for k, (_, nbytes) in sides.items():
                ratio = {"swarmlm-int8": med["torch-int8"] / med[k], "swarmlm-int4": med["torch-int4"] / med[k]}.get(k)
                print(json.dumps({"name": "model_qkernels.product", "shape": name, "N": N, "K": K, "side": k,
                                  "value": round(med[k] * 1e6, 1), "unit": "us",
                                  "GB_per_s": round(nbytes / med[k] / 1e9, 1),
                                  "speedup_vs_torch_same_bits": None if ratio is None else round(ratio, 2),
                                  "speedup_vs_fp32": round(med["torch-fp32"] / med[k], 2),
                                  "threads": args.threads}))


if __name__ == "__main__":
    main()
