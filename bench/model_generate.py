"""Greedy generation speed: swarmlm's KV-cache decode loop against transformers' `generate`.

Both sides run the same random-weight Llama (saved once by swarmlm, loaded by each), in one
process, with the same prompt; each is warmed up once, then timed `--repeats` times. Prints
one JSON line per result: tokens/s of each side (median), and their ratio.

    python bench/model_generate.py [--preset small] [--prompt-len 32] [--new-tokens 64] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from swarmlm.model.config import PRESETS
from swarmlm.model.generate import generate
from swarmlm.model.hf import load_model, save_model
from swarmlm.model.transformer import Transformer


def _time_interleaved(fns: dict, repeats: int) -> tuple[dict[str, float], dict[str, list[int]]]:
    """Median seconds per call of each fn, alternating them so drifting machine load hits both alike."""
    outputs = {name: fn() for name, fn in fns.items()}  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            outputs[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import transformers

    cfg = PRESETS[args.preset].replace(eos_token_id=None, bos_token_id=None)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as directory:
        save_model(Transformer(cfg), cfg, directory)
        ours, _ = load_model(directory)
        theirs = transformers.LlamaForCausalLM.from_pretrained(directory).eval()
    theirs.generation_config.eos_token_id = None
    theirs.generation_config.pad_token_id = 0
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    n = args.new_tokens

    def hf_generate() -> list[int]:
        with torch.inference_mode():
            out = theirs.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return out[0, len(prompt):].tolist()

    seconds, tokens = _time_interleaved({"swarmlm": lambda: generate(ours, prompt, max_new_tokens=n),
                                         "transformers": hf_generate}, args.repeats)
    ours_s, hf_s = seconds["swarmlm"], seconds["transformers"]
    ours_tokens, hf_tokens = tokens["swarmlm"], tokens["transformers"]
    common = {"preset": args.preset, "prompt_len": args.prompt_len, "new_tokens": n, "repeats": args.repeats,
              "threads": args.threads, "same_tokens": ours_tokens == hf_tokens}
    for name, value, unit in (("model_generate.swarmlm_tokens_per_s", n / ours_s, "tokens/s"),
                              ("model_generate.transformers_tokens_per_s", n / hf_s, "tokens/s"),
                              ("model_generate.speedup", hf_s / ours_s, "x")):
        print(json.dumps({"name": name, "value": round(value, 3), "unit": unit, **common}))


if __name__ == "__main__":
    main()
