"""The demo: train the tiny model on the Python standard library, then generate from it.

Wires library calls together and prints; holds no logic of its own.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from swarmlm.model.generate import generate
from swarmlm.model.hf import load_model
from swarmlm.model.tokenizer import Tokenizer
from swarmlm.train.config import load_run_config
from swarmlm.train.loop import train

PROMPT = "def "


def run_demo(*, peers: int = 3, steps: int = 200, out: str | None = None) -> int:
    """Train, generate, summarize; returns the process exit code."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="swarmlm-demo-") as tmp:
        run_dir = Path(out) if out else Path(tmp) / "model"
        run = load_run_config("tiny", steps=steps)
        print(f"[1/2] training the tiny model for {steps} steps on the Python standard library ...", flush=True)
        result = train(run, run_dir)
        print(f"      validation loss {result.first_val_loss:.3f} → {result.final_val_loss:.3f}", flush=True)

        print(f"[2/2] generating from {run_dir} ...", flush=True)
        model, cfg = load_model(run_dir)
        tok = Tokenizer.load(run_dir)
        prompt_ids = tok.encode(PROMPT)
        t_gen = time.perf_counter()
        out_ids = generate(model, prompt_ids, max_new_tokens=64, temperature=0.0, eos_id=tok.eos_id)
        gen_s = time.perf_counter() - t_gen
        print("-" * 60)
        print(PROMPT + tok.decode(out_ids))
        print("-" * 60)
        print("summary:")
        print(f"  model      {cfg.architecture}, {result.n_params / 1e6:.2f}M parameters, {cfg.n_layers} blocks")
        print(f"  training   {result.steps} steps, {result.tokens_per_s:.0f} tokens/s, "
              f"val loss {result.first_val_loss:.3f} → {result.final_val_loss:.3f}")
        print(f"  generation {len(out_ids)} tokens in {gen_s:.2f} s (greedy, KV cache)")
        print(f"  total      {time.perf_counter() - t0:.0f} s")
    return 0 if result.final_val_loss < result.first_val_loss else 1
