"""Generation through the OpenAI-compatible API (streaming, over HTTP on 127.0.0.1) against
`stream_generate` in process, in one run; then several streaming clients at once.

A random-weight model of `--preset` with a small BPE tokenizer (trained on the Python standard
library's own source) is served by `swarmlm api` (its own process, as a user runs it) on a free
port; the official `openai` client here streams a greedy completion of `--new-tokens` tokens,
against the same model generating in this process. Both sides are timed `--repeats` times,
alternating. Prints one JSON line per result ({"name", "value", "unit"}): the decode rate after
the first token and the time to first token of each side (medians), their ratio, and the total
tokens/s of `--clients` concurrent streaming clients.

With `--swarm`, the blocks run on two `swarmlm serve` processes on 127.0.0.1 (half the blocks
each) and both sides go through them: the API's streaming against `RemoteModel.stream_generate`
in this process (the same swarm, the same client), so the ratio is what the API adds to swarm
generation.

    python bench/api_generate.py [--preset small] [--new-tokens 64] [--repeats 5] [--clients 8] [--threads 1]
                                 [--swarm]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import statistics
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

import torch

from swarmlm.api.backends import LocalBackend, SwarmBackend
from swarmlm.api.run import build_app
from swarmlm.api.server import serve
from swarmlm.model.config import PRESETS
from swarmlm.model.generate import stream_generate
from swarmlm.model.hf import load_model, save_model
from swarmlm.model.tokenizer import Tokenizer
from swarmlm.model.transformer import Transformer
from swarmlm.swarm.client.model import LoopThread, RemoteModel
from swarmlm.swarm.server.serve import start_server_process

PROMPT = "def main(argv):\n    parser = argparse.ArgumentParser("


def emit(name: str, value: float, unit: str) -> None:
    print(json.dumps({"name": name, "value": round(value, 4), "unit": unit}), flush=True)


def rate(times: list[float], start: float) -> tuple[float, float]:
    """(tokens/s after the first token, seconds to the first token)."""
    ttft = times[0] - start
    return ((len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0), ttft


def in_process(model, prompt_ids: list[int], n: int) -> tuple[float, float]:
    start = time.perf_counter()
    if isinstance(model, RemoteModel):
        times = [time.perf_counter() for _ in model.stream_generate([prompt_ids], max_new_tokens=n)]
    else:
        times = [time.perf_counter() for _ in stream_generate(model, prompt_ids, max_new_tokens=n)]
    return rate(times, start)


def through_api(client, name: str, prompt_ids: list[int], n: int) -> tuple[float, float, int]:
    start = time.perf_counter()
    times, tokens = [], 0
    stream = client.completions.create(model=name, prompt=prompt_ids, max_tokens=n, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            times.append(time.perf_counter())
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return (*rate(times, start), tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--swarm", action="store_true", help="both sides through two `swarmlm serve` processes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from openai import OpenAI

    corpus = [p.read_text(errors="ignore") for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:40]]
    tokenizer = Tokenizer.train_bpe(corpus, vocab_size=2048)
    cfg = PRESETS[args.preset].replace(vocab_size=tokenizer.vocab_size, eos_token_id=None, bos_token_id=None)
    torch.manual_seed(0)
    directory = tempfile.mkdtemp(prefix="swarmlm-bench-api-")
    save_model(Transformer(cfg), cfg, directory)
    tokenizer.save(directory)
    servers = []
    if args.swarm:
        env = {"OMP_NUM_THREADS": str(args.threads)}
        n_layers = cfg.n_layers
        a = start_server_process(directory, blocks=(0, n_layers // 2), data_dir=Path(directory) / "a", env=env)
        servers.append(a)
        servers.append(start_server_process(directory, blocks=(n_layers // 2, n_layers), initial_peers=a.maddrs,
                                            data_dir=Path(directory) / "b", env=env))
        model = RemoteModel.connect(directory, initial_peers=a.maddrs)
    else:
        model, _ = load_model(directory)
        model.requires_grad_(False)
        api_process = subprocess.Popen([sys.executable, "-m", "swarmlm", "api", directory, "--port", "0"],
                                       stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS":
                                                                               str(args.threads)})
        url = []
        for line in api_process.stdout:             # its base URL is its last line once it is ready
            if line.startswith("http"):
                url.append(line.strip())
                break
    prompt_ids = tokenizer.encode(PROMPT)
    n = args.new_tokens

    if args.swarm:
        # eos never stops the random model early, so every run decodes exactly --new-tokens
        api = build_app(SwarmBackend(model), directory, "bench", api_key=None, eos_id=-1)
        runner = LoopThread()
        stop = asyncio.Event()
        ready = threading.Event()
        url = []
        server = asyncio.run_coroutine_threadsafe(
            serve(api.app, "127.0.0.1", 0, stop=stop, on_ready=lambda u: (url.append(u), ready.set())), runner.loop)
        ready.wait(30)
    name = "bench" if args.swarm else Path(directory).name
    client = OpenAI(base_url=url[0], api_key="x", max_retries=0, timeout=600)
    try:
        in_process(model, prompt_ids, n), through_api(client, name, prompt_ids, n)      # warm-up
        local, remote = [], []
        for _ in range(args.repeats):
            local.append(in_process(model, prompt_ids, n))
            remote.append(through_api(client, name, prompt_ids, n))
        local_tps = statistics.median(r for r, _ in local)
        api_tps = statistics.median(r for r, _, _ in remote)
        where = "swarm_" if args.swarm else ""
        emit(f"{where}in_process_tokens_per_s", local_tps, "tokens/s")
        emit(f"{where}api_stream_tokens_per_s", api_tps, "tokens/s")
        emit(f"{where}api_over_in_process_rate", api_tps / local_tps, "ratio")
        emit(f"{where}in_process_ttft", statistics.median(t for _, t in local) * 1e3, "ms")
        emit(f"{where}api_stream_ttft", statistics.median(t for _, t, _ in remote) * 1e3, "ms")

        totals: list[int] = [0] * args.clients
        barrier = threading.Barrier(args.clients + 1)

        def one(i: int) -> None:
            barrier.wait()
            totals[i] = through_api(client, name, prompt_ids, n)[2]

        threads = [threading.Thread(target=one, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        barrier.wait()
        start = time.perf_counter()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        emit(f"{where}api_{args.clients}_clients_total_tokens_per_s", sum(totals) / elapsed, "tokens/s")
    finally:
        if args.swarm:
            runner.loop.call_soon_threadsafe(stop.set)
            server.result(30)
            runner.close()
            model.close()
        else:
            api_process.terminate()
            api_process.wait(30)
        for s in servers:
            s.stop()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
