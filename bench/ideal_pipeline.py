"""The ideal two-server pipeline: the ceiling of any two-server swarm on this machine.

The model's blocks split in two halves, each in its own process, as in the swarm; this process
embeds, computes the head and picks the token, as the swarm's client does. But the hidden
states travel between the three processes over OS pipes as raw bytes: no serialization, no
checks, no encryption, no asyncio, no sessions. What it loses against one local process is what
any pipeline of processes loses here (the hand-offs, and each half's compute slowing down on
the core the other half left idle), so its ratio to local is the bound a swarm can reach on this
machine, and the swarm's ratio to it is what the swarm's own protocol costs.

Greedy decoding only. As a script it prints the ideal pipeline against one local process, and
the blocks' compute per token in the pipeline (its two stages' median steps) against all of
them computed in one process, which is where most of what it loses goes:

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
_STOP = b"stop"                     # then each stage's median one-token compute time, in order
_READY = b"ready"
_MEDIAN = struct.Struct("<d")


def _stage(ckpt: str, start: int, end: int, inbox, outbox, threads: int) -> None:
    """One half of the blocks: hidden states in from `inbox`, out to `outbox`, until told to stop."""
    from swarmlm.model.cache import KVCache
    from swarmlm.model.hf import load_model
    from swarmlm.swarm.blocks import run_span

    torch.set_num_threads(threads)
    model, cfg = load_model(ckpt, layers=range(start, end), with_embed=False, with_head=False)
    cache = KVCache.empty(cfg, 1, cfg.max_seq_len, layers=range(start, end))
    if start > 0:
        assert inbox.recv_bytes() == _READY          # the stages before are loaded too
    outbox.send_bytes(_READY)
    steps = []                                        # seconds of compute of each one-token step
    with torch.inference_mode():
        while not (msg := inbox.recv_bytes()).startswith(_STOP):
            (T,) = _HEADER.unpack_from(msg)
            if T == 0:
                cache.trim(0)
                outbox.send_bytes(msg)
                continue
            h = torch.frombuffer(bytearray(msg[_HEADER.size:]), dtype=torch.float32).view(1, T, cfg.dim)
            t0 = time.perf_counter()
            out = run_span(model, h, start, end, cache=cache)    # the servers' very computation
            if T == 1:
                steps.append(time.perf_counter() - t0)
            outbox.send_bytes(_HEADER.pack(T) + out.numpy().tobytes())
    median = statistics.median(steps) if steps else float("nan")
    outbox.send_bytes(msg + _MEDIAN.pack(median))     # on to the next stage with ours, then back here


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
        self.stage_step_s: list[float] = []       # once closed: each stage's median one-token compute
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
            while self._recv.poll(10):
                msg = self._recv.recv_bytes()
                if msg.startswith(_STOP):
                    tail = msg[len(_STOP):]
                    self.stage_step_s = [_MEDIAN.unpack_from(tail, i)[0] for i in range(0, len(tail), _MEDIAN.size)]
                    break
        finally:
            for p in self._procs:
                if p.is_alive():
                    p.kill()
                p.join(timeout=10)

    def __enter__(self) -> "IdealPipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def random_model(preset: str, directory: Path, prompt_len: int):
    """A random-weight checkpoint of `preset` (no bos/eos: decoding runs its full length) saved in
    `directory`/model, loaded here, and a random prompt: (cfg, checkpoint path, model, prompt), the same
    for every bench that compares against this pipeline."""
    from swarmlm.model.config import PRESETS
    from swarmlm.model.hf import load_model, save_model
    from swarmlm.model.transformer import Transformer

    cfg = PRESETS[preset].replace(eos_token_id=None, bos_token_id=None)
    ckpt = Path(directory) / "model"
    torch.manual_seed(0)
    save_model(Transformer(cfg), cfg, ckpt)
    local, _ = load_model(ckpt)
    prompt = torch.randint(0, cfg.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    return cfg, ckpt, local, prompt


def main() -> None:
    from swarmlm.model.config import PRESETS
    from swarmlm.model.generate import stream_generate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cfg, ckpt, local, prompt = random_model(args.preset, Path(tmp), args.prompt_len)
        with IdealPipeline(str(ckpt), cfg.n_layers, threads=args.threads) as ideal:
            ratios, same, one_process = [], True, []
            for i in range(args.repeats + 1):
                a = timed_stream(ideal.stream_generate(local, prompt, max_new_tokens=args.new_tokens))
                b = timed_stream(stream_generate(local, prompt, max_new_tokens=args.new_tokens))
                c = blocks_step_s(local, prompt, args.new_tokens)
                same &= a[2] == b[2]
                if i:
                    ratios.append(a[1] / b[1])
                    one_process.append(c)
    emit("ideal_pipeline_vs_local_tokens_per_s_ratio", statistics.median(ratios), "ratio", identical_tokens=same,
         of="median of per-round ratios")
    pipeline_ms, local_ms = sum(ideal.stage_step_s) * 1000, statistics.median(one_process) * 1000
    emit("pipeline_blocks_compute_per_token", pipeline_ms, "ms", of="sum of the stages' median one-token steps")
    emit("one_process_blocks_compute_per_token", local_ms, "ms", of="median one-token step of all blocks")
    emit("pipeline_vs_one_process_compute_ratio", pipeline_ms / local_ms, "ratio",
         meaning="how much slower the same blocks compute split over two processes")


def emit(name: str, value: float, unit: str, **extra) -> None:
    print(json.dumps({"name": name, "value": round(value, 4), "unit": unit, **extra}), flush=True)


def blocks_step_s(local, prompt: list[int], new_tokens: int) -> float:
    """The median time of the one-token steps through all of `local`'s blocks in a greedy decode in
    this process (embedding and head between them, as in local generation)."""
    from swarmlm.model.cache import KVCache
    from swarmlm.swarm.blocks import run_span

    cache = KVCache.empty(local.cfg, 1, len(prompt) + new_tokens)
    ids, position, steps = torch.tensor([prompt]), 0, []
    with torch.inference_mode():
        for _ in range(new_tokens):
            T = ids.shape[1]
            h = local.embed(ids, torch.arange(position, position + T)[None])
            t0 = time.perf_counter()
            h = run_span(local, h, 0, local.cfg.n_layers, cache=cache)
            if T == 1:
                steps.append(time.perf_counter() - t0)
            position += T
            ids = local.head(h[:, -1:])[:, 0].argmax(-1, keepdim=True)     # (1, 1)
    return statistics.median(steps)


def timed_stream(stream) -> tuple[float, float, list[int]]:
    """(time to first token, decode tokens/s after the first, tokens) of a stream of per-step token lists."""
    t0 = time.perf_counter()
    times, tokens = [], []
    for step in stream:
        times.append(time.perf_counter())
        tokens.append(step[0])
    ttft = times[0] - t0
    rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0
    return ttft, rate, tokens


if __name__ == "__main__":
    main()
