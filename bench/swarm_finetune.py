"""One prompt-tuning step through two servers against the same step run locally.

Builds a random-weight model of `--preset` (default `small`), starts two `swarmlm serve`
processes on 127.0.0.1 holding half the blocks each, and times a full training step
(forward, backward through the servers' frozen blocks, AdamW on the prompts) on a batch of
`--batch-size` x `--seq-len` tokens, alternating swarm and local steps. Prints one JSON line
per result: the median seconds of each side and their ratio (target <= 1.5).

    python bench/swarm_finetune.py [--preset small] [--batch-size 8] [--seq-len 128] [--prompt-len 16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from swarmlm.model.config import PRESETS
from swarmlm.model.hf import load_model, save_model
from swarmlm.model.transformer import Transformer
from swarmlm.swarm.client.model import RemoteModel
from swarmlm.swarm.finetune import Adapters, TuneConfig, lm_loss, local_blocks
from swarmlm.swarm.server.serve import start_server_process


def emit(name: str, value: float, unit: str, **extra) -> None:
    print(json.dumps({"name": name, "value": round(value, 4), "unit": unit, **extra}), flush=True)


def make_step(local, run_blocks, adapters):
    adapters.attach(local)
    opt = torch.optim.AdamW(list(adapters.trainable().values()), lr=1e-2)

    def step(ids: torch.Tensor) -> float:
        loss = lm_loss(local, run_blocks, adapters, ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads here and in each server")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    env = {"OMP_NUM_THREADS": str(args.threads)}

    cfg = PRESETS[args.preset]
    n = cfg.n_layers
    tune = TuneConfig(prompt_len=args.prompt_len, batch_size=args.batch_size, seq_len=args.seq_len)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "model"
        torch.manual_seed(0)
        save_model(Transformer(cfg), cfg, ckpt)
        local, _ = load_model(ckpt)
        local.requires_grad_(False)
        ids = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(0))
        servers = []
        try:
            a = start_server_process(str(ckpt), blocks=(0, n // 2), data_dir=Path(tmp) / "a", env=env)
            servers.append(a)
            servers.append(start_server_process(str(ckpt), blocks=(n // 2, n), initial_peers=a.maddrs,
                                                data_dir=Path(tmp) / "b", env=env))
            with RemoteModel.connect(str(ckpt), initial_peers=a.maddrs) as model:
                swarm_step = make_step(model.local, model.run_blocks, Adapters(cfg, tune))
                local_step = make_step(local, local_blocks(local), Adapters(cfg, tune))
                times = {"swarm": [], "local": []}
                losses = {}
                for i in range(args.repeats + 1):             # the first round warms both up
                    for name, step in (("swarm", swarm_step), ("local", local_step)):
                        t0 = time.perf_counter()
                        losses[name] = step(ids)
                        if i:
                            times[name].append(time.perf_counter() - t0)
        finally:
            for s in servers:
                s.stop()
    swarm_s, local_s = statistics.median(times["swarm"]), statistics.median(times["local"])
    shape = f"{args.batch_size}x{args.seq_len}"
    emit("prompt_tuning_step_swarm_2_servers", swarm_s, "s", batch=shape, loss=round(losses["swarm"], 4))
    emit("prompt_tuning_step_local", local_s, "s", batch=shape, loss=round(losses["local"], 4))
    emit("prompt_tuning_step_swarm_vs_local_ratio", swarm_s / local_s, "ratio", target=1.5)


if __name__ == "__main__":
    main()
