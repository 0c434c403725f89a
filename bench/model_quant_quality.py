"""What quantization costs in perplexity: `swarmlm eval`'s numbers at fp32, int8 and int4.

For each checkpoint directory given, scores the same held-out text (default: swarmlm's own
source files, which no preset is trained on: the default corpus is the Python standard
library) at every quantization, and prints one JSON line per (model, quantization) with the
perplexity and its change relative to fp32. Targets (issue 17): int8 within 1%, int4 within 5%.

    python bench/model_quant_quality.py RUN_DIR [RUN_DIR ...] [--data FILE] [--max-tokens N]

To make the checkpoints: `swarmlm train --config tiny --steps 300 --out runs/tiny300` (and
`--config small` for the small preset).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from swarmlm.model.evaluate import perplexity
from swarmlm.model.hf import load_config, load_model
from swarmlm.model.quant import quantize_model
from swarmlm.model.tokenizer import Tokenizer

SCHEMES = ("none", "int8", "int4-g32", "int4-g64", "int4-g128")
TARGETS = {"int8": 0.01, "int4-g32": 0.05, "int4-g64": 0.05, "int4-g128": 0.05}


def held_out_text() -> str:
    root = Path(__file__).resolve().parents[1] / "src" / "swarmlm"
    return "\n".join(p.read_text() for p in sorted(root.rglob("*.py")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--data", default=None, help="held-out text file (default: swarmlm's own source)")
    parser.add_argument("--max-tokens", type=int, default=65536, help="score at most this many tokens")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    text = Path(args.data).read_text() if args.data else held_out_text()
    for directory in args.models:
        cfg = load_config(directory)
        ids = Tokenizer.load(directory).encode(text)[:args.max_tokens]
        base = None
        for scheme in SCHEMES:
            if scheme.startswith("int4") and cfg.dim < int(scheme.rsplit("g", 1)[1]):
                continue
            model, _ = load_model(directory)
            quantize_model(model.requires_grad_(False), scheme)
            result = perplexity(model, ids, window=cfg.context_len)
            base = result.perplexity if scheme == "none" else base
            change = result.perplexity / base - 1
            print(json.dumps({"name": "model_quant_quality.perplexity", "model": str(directory),
                              "quantization": scheme, "tokens": result.tokens, "perplexity": round(result.perplexity, 4),
                              "change_vs_fp32": round(change, 5), "target": TARGETS.get(scheme),
                              "within_target": None if scheme == "none" else abs(change) <= TARGETS[scheme]}),
                  flush=True)


if __name__ == "__main__":
    main()
