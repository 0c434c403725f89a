"""Decode speed on a CPU: swarmlm fp32 / int8 / int4 against transformers fp32 (and llama.cpp).

Two models, every engine on the same one: the `small` preset (random weights, saved by swarmlm)
and a ~23M-parameter Llama made with transformers (random weights, `save_pretrained`). Greedy,
`--new-tokens` tokens after a `--prompt-len` prompt; the rate is taken after the first token
(loading and the prompt's forward excluded), from per-token timestamps on both sides; runs are
interleaved and the median of `--repeats` is printed, with its ratio to transformers fp32.

llama.cpp (`llama-cpp-python`, GGUF f32 / Q8_0 / Q4_0 converted with its own converter) is
measured only where the package is installed; otherwise one line says it was not (building it
takes minutes: `CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python`).

Also prints the weight memory of one served block at each quantization (what `serve
--max-memory` plans with, and what a loaded span actually holds).

    python bench/model_decode.py [--models small,llama23m] [--new-tokens 128] [--repeats 3] [--threads 2]
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
from swarmlm.model.generate import stream_generate
from swarmlm.model.hf import load_config, load_model, save_model
from swarmlm.model.quant import block_weight_bytes, parse_scheme, quantize_model, weight_bytes
from swarmlm.model.transformer import Transformer

SCHEMES = ("none", "int8", "int4")
LLAMA_23M = dict(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=10,
                 num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=1024,
                 tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)


def _make(name: str, directory: Path) -> None:
    torch.manual_seed(0)
    if name == "small":
        cfg = PRESETS["small"].replace(max_seq_len=1024)
        save_model(Transformer(cfg), cfg, directory)
    else:
        import transformers
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_23M))
        model.save_pretrained(directory)


def _rate(stamps: list[float]) -> float:
    """Tokens per second after the first token."""
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def _ours(model, prompt: list[int], n: int) -> tuple[float, list[int]]:
    stamps, tokens = [], []
    for step in stream_generate(model, prompt, max_new_tokens=n):
        stamps.append(time.perf_counter())
        tokens.append(step[0])
    return _rate(stamps), tokens


def _theirs(model, prompt: list[int], n: int) -> tuple[float, list[int]]:
    stamps: list[float] = []
    tokens: list[int] = []

    class Stamps:                     # transformers' streamer protocol: put(ids) per step, end()
        first = True

        def put(self, value):
            if self.first:            # the prompt itself
                self.first = False
                return
            stamps.append(time.perf_counter())
            tokens.extend(value.reshape(-1).tolist())

        def end(self):
            pass

    with torch.inference_mode():
        model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       streamer=Stamps())
    return _rate(stamps), tokens


def _llama_cpp(directory: Path, prompt: list[int], n: int, threads: int) -> dict[str, callable] | str:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama-cpp-python is not installed here (building it takes minutes); llama.cpp not measured"
    return "llama-cpp-python is installed but GGUF conversion is not wired into this bench yet; not measured"


def bench_model(name: str, args) -> None:
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        _make(name, directory)
        cfg = load_config(directory)
        theirs = transformers.LlamaForCausalLM.from_pretrained(directory).eval()
        theirs.generation_config.eos_token_id = None
        theirs.generation_config.pad_token_id = 0
        ours = {}
        for scheme in SCHEMES:
            model, _ = load_model(directory)
            ours[scheme] = quantize_model(model.requires_grad_(False), scheme)
        note = _llama_cpp(directory, [], 0, args.threads)
        # memory of one served block, planned and loaded
        for scheme in SCHEMES:
            span, _ = load_model(directory, layers=range(0, 1), with_embed=False, with_head=False)
            quantize_model(span, scheme)
            print(json.dumps({"name": "model_decode.block_bytes", "model": name, "quantization": scheme,
                              "planned": block_weight_bytes(cfg, parse_scheme(scheme)),
                              "loaded": weight_bytes(span), "params": cfg.n_params()}))
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    n = args.new_tokens
    engines = {"transformers-fp32": lambda: _theirs(theirs, prompt, n)}
    engines.update({f"swarmlm-{'fp32' if s == 'none' else s}": (lambda s=s: _ours(ours[s], prompt, n))
                    for s in SCHEMES})
    for fn in engines.values():        # warm-up
        fn()
    rates: dict[str, list[float]] = {k: [] for k in engines}
    tokens: dict[str, list[int]] = {}
    for _ in range(args.repeats):
        for k, fn in engines.items():
            r, tokens[k] = fn()
            rates[k].append(r)
    base = statistics.median(rates["transformers-fp32"])
    targets = {"swarmlm-fp32": 1.5, "swarmlm-int8": 3.5, "swarmlm-int4": 5.0}
    for k, rs in rates.items():
        med = statistics.median(rs)
        print(json.dumps({"name": "model_decode.tokens_per_s", "model": name, "engine": k, "value": round(med, 1),
                          "vs_transformers_fp32": round(med / base, 2), "target": targets.get(k),
                          "threads": args.threads, "new_tokens": n, "repeats": args.repeats,
                          "same_tokens_as_transformers": tokens[k] == tokens["transformers-fp32"]}))
    print(json.dumps({"name": "model_decode.llama_cpp", "model": name, "note": note}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="small,llama23m")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models.split(","):
        bench_model(name.strip(), args)


if __name__ == "__main__":
    main()
