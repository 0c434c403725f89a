"""The ideal two-server pipeline: the ceiling of any two-server swarm on this machine.

The model's blocks split in two halves, each in its own process, as in the swarm; this process
embeds, computes the head and picks the token, as the swarm's client does. But the hidden
states travel between the three processes over OS pipes as raw bytes: no serialization, no
checks, no encryption, no asyncio, no sessions. What it loses against one local process is what
any pipeline of processes loses here (the hand-offs, and each half's compute slowing down on
the core the other half left idle), so its ratio to local is the bound a swarm can reach on this
machine, and the swarm's ratio to it is what the swarm's own protocol costs.

Greedy decoding only. As a script it prints the ideal pipeline against one local process:

    python bench/ideal_pipeline.py [--preset small] [--prompt-len 32] [--new-tokens 64] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import struct
import tempfile
import time
from pathlib import Path
from typing import Iterator

import torch

_HEADER = struct.Struct("<I")       # the number of new positions; 0 starts a new sequence
_STOP = b"stop"
_READY = b"ready"


def _stage(ckpt: str, start: int, end: int, inbox, outbox, threads: int) -> None:
    """One half of the blocks: hidden states in from `inbox`, out to `outbox`, until told to stop."""
    from swarmlm.model.cache import KVCache
    from swarmlm.model.hf import load_model

    torch.set_num_threads(threads)
    model, cfg = load_model(ckpt, layers=range(start, end), with_embed=False, with_head=False)
    cache = KVCache.empty(cfg, 1, cfg.max_seq_len, layers=range(start, end))
    if start > 0:
        assert inbox.recv_bytes() == _READY          # the stages before are loaded too
    outbox.send_bytes(_READY)
    with torch.inference_mode():
        while (msg := inbox.recv_bytes()) != _STOP:
            (T,) = _HEADER.unpack_from(msg)
            if T == 0:
                cache.trim(0)
                outbox.send_bytes(msg)
                continue
            h = torch.frombuffer(bytearray(msg[_HEADER.size:]), dtype=torch.float32).view(1, T, cfg.dim)
            out = model.run_blocks(h, start=start, end=end, cache=cache)
            outbox.send_bytes(_HEADER.pack(T) + out.numpy().tobytes())
    outbox.send_bytes(_STOP)                          # on to the next stage, then back here


class IdealPipeline:
    """`with IdealPipeline(ckpt, n_layers) as p: p.stream_generate(local, prompt, max_new_tokens=...)`."""

    def __init__(self, ckpt: str, n_layers: int, *, threads: int = 1):
        ctx = mp.get_context("spawn")
        to_a, a_in = ctx.Pipe(duplex=False)        # (receiving end, sending end)
        to_b, a_out = ctx.Pipe(duplex=False)
        back, b_out = ctx.Pipe(duplex=False)
        half = n_layers // 2
        self._procs = [ctx.Process(target=_stage, args=(ckpt, 0, half, to_a, a_out, threads), daemon=True),
                       ctx.Process(target=_stage, args=(ckpt, half, n_layers, to_b, b_out, threads), daemon=True)]
        self._send, self._recv = a_in, back
        for p in self._procs:
            p.start()
        if not back.poll(120) or back.recv_bytes() != _READY:
            self.close()
            raise RuntimeError("the pipeline's stages did not start")

    def _run(self, h: torch.Tensor) -> torch.Tensor:
        T, D = h.shape[1], h.shape[2]
        self._send.send_bytes(_HEADER.pack(T) + h.contiguous().numpy().tobytes())
        msg = self._recv.recv_bytes()
        return torch.frombuffer(bytearray(msg[_HEADER.size:]), dtype=torch.float32).view(1, T, D)

    def stream_generate(self, local, prompt: list[int], *, max_new_tokens: int) -> Iterator[list[int]]:
        """Greedy tokens, one list per step, as model.generate.stream_generate (local: embedding and head)."""
        self._send.send_bytes(_HEADER.pack(0))
        self._recv.recv_bytes()
        ids, position = torch.tensor([prompt]), 0
        with torch.inference_mode():
            for _ in range(max_new_tokens):
                T = ids.shape[1]
                h = self._run(local.embed(ids, torch.arange(position, position + T)[None]))
                position += T
                token = int(local.head(h[:, -1:])[0, 0].argmax())
                yield [token]
                ids = torch.tensor([[token]])

    def close(self) -> None:
        try:
            self._send.send_bytes(_STOP)
            while self._recv.poll(10) and self._recv.recv_bytes() != _STOP:
                pass
        finally:
            for p in self._procs:
                if p.is_alive():
                    p.kill()
                p.join(timeout=10)

    def __enter__(self) -> "IdealPipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main() -> None:
    from swarmlm.model.config import PRESETS
    from swarmlm.model.generate import stream_generate
    from swarmlm.model.hf import load_model, save_model
    from swarmlm.model.transformer import Transformer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = PRESETS[args.preset].replace(eos_token_id=None, bos_token_id=None)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "model"
        torch.manual_seed(0)
        save_model(Transformer(cfg), cfg, ckpt)
        local, _ = load_model(ckpt)
        prompt = torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
        with IdealPipeline(str(ckpt), cfg.n_layers, threads=args.threads) as ideal:
            ratios, same = [], True
            for i in range(args.repeats + 1):
                a = decode_rate(ideal.stream_generate(local, prompt, max_new_tokens=args.new_tokens))
                b = decode_rate(stream_generate(local, prompt, max_new_tokens=args.new_tokens))
                same &= a[1] == b[1]
                if i:
                    ratios.append(a[0] / b[0])
    print(json.dumps({"name": "ideal_pipeline_vs_local_tokens_per_s_ratio", "value": round(statistics.median(ratios), 4),
                      "unit": "ratio", "identical_tokens": same, "of": "median of per-round ratios"}))


def decode_rate(stream) -> tuple[float, list[int]]:
    """(tokens/s after the first token, tokens) of a stream of per-step token lists."""
    times, tokens = [], []
    for step in stream:
        times.append(time.perf_counter())
        tokens.append(step[0])
    return (len(times) - 1) / (times[-1] - times[0]), tokens


if __name__ == "__main__":
    main()
