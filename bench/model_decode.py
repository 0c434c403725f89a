"""Decode speed on a CPU: swarmlm fp32 / int8 / int4 against transformers fp32 (and llama.cpp).

Two models, every engine on the same one: the `small` preset (random weights, saved by swarmlm)
and a ~23M-parameter Llama made with transformers (random weights, `save_pretrained`). Greedy,
`--new-tokens` tokens after a `--prompt-len` prompt; the rate is taken after the first token
(loading and the prompt's forward excluded), from per-token timestamps on both sides; runs are
interleaved and the median of `--repeats` is printed, with its ratio to transformers fp32.

llama.cpp (`llama-cpp-python`, a bench-only package) runs the same checkpoint: converted to an
f32 GGUF by llama.cpp's own `convert_hf_to_gguf.py` (from the package's source distribution,
fetched once into `--llama-cpp-cache`), then quantized to Q8_0 and Q4_0 by
`llama_cpp.llama_model_quantize`; its decode rate comes from its own timers
(`llama_perf_context`: decode steps only). Where the package is missing, one line says so;
`--install-llama-cpp` installs it first (it builds llama.cpp from source: minutes;
`CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" pip install llama-cpp-python` by hand). Where
llama.cpp's default extra weight buffers (AMX / repacked kernels) crash (a CPU that reports AMX
a virtual machine does not allow: SIGILL), it runs without them and a line says so.

Every rate is printed twice: by the wall clock (`value`) and by this process's CPU time
(`cpu_value`). On a machine shared with other work, the CPU time moves far less with the other
load; with one thread it compares the engines' work per token, with more it sums the threads.

The quantized engines run model/qkernels.py's products: the compiled AVX512-VNNI kernels where
they build, else the torch reference (one line says which).

Also prints the weight memory of one served block at each quantization (what `serve
--max-memory` plans with, and what a loaded span actually holds).

    python bench/model_decode.py [--models small,llama23m] [--new-tokens 128] [--repeats 3] [--threads 2]
                                 [--install-llama-cpp | --no-llama-cpp]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
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


def _stamp() -> tuple[float, float]:
    """(wall clock, this process's CPU time): on a shared machine the CPU time counts only the
    time this process ran, so it moves less with the other load than the wall clock does."""
    return time.perf_counter(), time.process_time()


def _rate(stamps: list[tuple[float, float]]) -> tuple[float, float]:
    """(wall, CPU) tokens per second after the first token."""
    n = len(stamps) - 1
    return n / (stamps[-1][0] - stamps[0][0]), n / max(stamps[-1][1] - stamps[0][1], 1e-9)


def _ours(model, prompt: list[int], n: int) -> tuple[float, float, list[int]]:
    stamps, tokens = [], []
    for step in stream_generate(model, prompt, max_new_tokens=n):
        stamps.append(_stamp())
        tokens.append(step[0])
    return *_rate(stamps), tokens


def _theirs(model, prompt: list[int], n: int) -> tuple[float, float, list[int]]:
    stamps: list[tuple[float, float]] = []
    tokens: list[int] = []

    class Stamps:                     # transformers' streamer protocol: put(ids) per step, end()
        first = True

        def put(self, value):
            if self.first:            # the prompt itself
                self.first = False
                return
            stamps.append(_stamp())
            tokens.extend(value.reshape(-1).tolist())

        def end(self):
            pass

    with torch.inference_mode():
        model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       streamer=Stamps())
    return *_rate(stamps), tokens


# ---- llama.cpp (bench-only: llama-cpp-python is not a dependency of the project) -------------

LLAMA_CPP_BUILD = 'CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" pip install llama-cpp-python'
GGUF_TYPES = {"Q8_0": 7, "Q4_0": 2}     # llama.cpp's LLAMA_FTYPE_MOSTLY_* numbers


def _llama_cpp_module(install: bool):
    """The llama_cpp module, installing it first when asked (a build from source, minutes), or a note why not."""
    try:
        import llama_cpp
        return llama_cpp
    except ImportError:
        if not install:
            return f"llama-cpp-python is not installed (add --install-llama-cpp, or run {LLAMA_CPP_BUILD})"
    env = dict(os.environ, CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF")
    print("installing llama-cpp-python (it builds llama.cpp from source: minutes)", file=sys.stderr)
    done = subprocess.run([sys.executable, "-m", "pip", "install", "llama-cpp-python"], env=env)
    if done.returncode:
        return f"installing llama-cpp-python failed (exit {done.returncode}); try {LLAMA_CPP_BUILD}"
    import llama_cpp
    return llama_cpp


def _converter(llama_cpp, cache_dir: Path) -> Path | str:
    """llama.cpp's own `convert_hf_to_gguf.py`, from the package's source distribution (the wheel
    does not ship it), downloaded once into `cache_dir`; or a note why not."""
    version = llama_cpp.__version__
    root = cache_dir / f"llama_cpp_python-{version}"
    script = root / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    cache_dir.mkdir(parents=True, exist_ok=True)
    got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                          f"llama-cpp-python=={version}", "-d", str(cache_dir)], capture_output=True, text=True)
    archive = cache_dir / f"llama_cpp_python-{version}.tar.gz"
    if got.returncode or not archive.is_file():
        return f"could not fetch llama-cpp-python {version}'s source for its converter: {got.stderr.strip()[-200:]}"
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(f"{root.name}/vendor/llama.cpp/")]
        tar.extractall(cache_dir, members=members, filter="data")
    return script if script.is_file() else f"{script.name} is not in llama-cpp-python {version}'s source"


# The converter identifies a BPE tokenizer by hashing how it splits a fixed text and refuses one
# it does not know (a freshly trained one): a byte-level BPE with GPT-2's regex is its "gpt-2"
# pre-tokenizer. Token ids are fed directly here, so the tokenizer only has to load. It also tries
# a SentencePiece vocabulary first, importing `sentencepiece` even where there is no
# tokenizer.model: without one it goes straight on to the BPE it has.
_CONVERT = """
import sys
from pathlib import Path
script, model_dir, out = sys.argv[1:4]
sys.path.insert(0, str(Path(script).parent))
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sentencepiece = base.TextModel._set_vocab_sentencepiece
def _no_sentencepiece(self, *args, **kwargs):
    if not (Path(model_dir) / "tokenizer.model").is_file():
        raise FileNotFoundError("no tokenizer.model")
    return sentencepiece(self, *args, **kwargs)
base.TextModel._set_vocab_sentencepiece = _no_sentencepiece
sys.argv = [script, model_dir, "--outtype", "f32", "--outfile", out]
import convert_hf_to_gguf
convert_hf_to_gguf.main()
"""


def _gguf_files(llama_cpp, script: Path, directory: Path, out: Path) -> dict[str, Path] | str:
    """f32 GGUF converted from the checkpoint in `directory`, Q8_0 and Q4_0 quantized from it by llama.cpp."""
    if not (directory / "tokenizer.json").is_file():         # the converter needs a vocabulary to write
        from swarmlm.model.tokenizer import Tokenizer
        text = [" ".join(f"word{i} token{i % 97} piece{i % 13}" for i in range(j, j + 50)) for j in range(0, 2000, 50)]
        Tokenizer.train_bpe(text, vocab_size=400).save(directory)
    files = {"f32": out / "model-f32.gguf"}
    done = subprocess.run([sys.executable, "-c", _CONVERT, str(script), str(directory), str(files["f32"])],
                          capture_output=True, text=True)
    if done.returncode or not files["f32"].is_file():
        return f"convert_hf_to_gguf.py failed: {done.stderr.strip()[-300:]}"
    for name, ftype in GGUF_TYPES.items():
        files[name] = out / f"model-{name}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        if llama_cpp.llama_model_quantize(str(files["f32"]).encode(), str(files[name]).encode(), params) != 0:
            return f"llama_model_quantize to {name} failed"
    return files


_PROBE = """
import sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=16, n_batch=8, n_threads=1, verbose=False)
llm.eval([1, 2])
llm.eval([3])
"""


def _extra_buffers_work(path: Path) -> bool:
    """Whether llama.cpp's default extra weight layouts (repacked and AMX kernels for quantized
    types) run here: a CPU may report AMX that the machine does not let a process use (SIGILL)."""
    return subprocess.run([sys.executable, "-c", _PROBE, str(path)], capture_output=True).returncode == 0


def _llama_cpp_engine(llama_cpp, path: Path, prompt: list[int], n: int, threads: int, extra_buffers: bool = True):
    """A function running one greedy generation -> (decode tokens/s by llama.cpp's own timers, by this
    process's CPU time between the first and the last token, tokens)."""
    low = llama_cpp.llama_cpp
    defaults = low.llama_model_default_params

    def without_extra_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params
    if not extra_buffers:
        low.llama_model_default_params = without_extra_buffers
    try:
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(prompt) + n + 8, n_batch=max(len(prompt), 8),
                              n_threads=threads, n_threads_batch=threads, verbose=False)
    finally:
        low.llama_model_default_params = defaults

    def run() -> tuple[float, float, list[int]]:
        llm.reset()
        llama_cpp.llama_perf_context_reset(llm.ctx)
        tokens, stamps = [], []
        for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            stamps.append(_stamp())
            tokens.append(int(token))
            if len(tokens) == n:
                break
        perf = llama_cpp.llama_perf_context(llm.ctx)      # decode steps only: the prompt is its own timer
        return perf.n_eval / (perf.t_eval_ms / 1e3), _rate(stamps)[1], tokens
    return run


def _llama_cpp(directory: Path, out: Path, prompt: list[int], n: int, args) -> dict | str:
    """{engine name: run function} for llama.cpp f32 / Q8_0 / Q4_0 on the checkpoint, or a note why not."""
    llama_cpp = _llama_cpp_module(args.install_llama_cpp)
    if isinstance(llama_cpp, str):
        return llama_cpp
    script = _converter(llama_cpp, Path(args.llama_cpp_cache))
    if isinstance(script, str):
        return script
    files = _gguf_files(llama_cpp, script, directory, out)
    if isinstance(files, str):
        return files
    extra = _extra_buffers_work(files["Q8_0"])
    if not extra:
        print(json.dumps({"name": "model_decode.llama_cpp", "note": "llama.cpp's extra weight buffers (repacked / "
                          "AMX kernels) crash on this machine: measured with use_extra_bufts=False"}))
    return {f"llama.cpp-{name}": _llama_cpp_engine(llama_cpp, path, prompt, n, args.threads, extra)
            for name, path in files.items()}


def bench_model(name: str, args) -> None:
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "model"
        _make(name, directory)
        cfg = load_config(directory)
        theirs = transformers.LlamaForCausalLM.from_pretrained(directory).eval()
        theirs.generation_config.eos_token_id = None
        theirs.generation_config.pad_token_id = 0
        ours = {}
        for scheme in SCHEMES:
            model, _ = load_model(directory)
            ours[scheme] = quantize_model(model.requires_grad_(False), scheme)
        # memory of one served block, planned and loaded
        for scheme in SCHEMES:
            span, _ = load_model(directory, layers=range(0, 1), with_embed=False, with_head=False)
            quantize_model(span, scheme)
            print(json.dumps({"name": "model_decode.block_bytes", "model": name, "quantization": scheme,
                              "planned": block_weight_bytes(cfg, parse_scheme(scheme)),
                              "loaded": weight_bytes(span), "params": cfg.n_params()}))
        prompt = torch.randint(0, cfg.vocab_size, (args.prompt_len,),
                               generator=torch.Generator().manual_seed(1)).tolist()
        n = args.new_tokens
        engines = {"transformers-fp32": lambda: _theirs(theirs, prompt, n)}
        engines.update({f"swarmlm-{'fp32' if s == 'none' else s}": (lambda s=s: _ours(ours[s], prompt, n))
                        for s in SCHEMES})
        theirs_cpp = _llama_cpp(directory, Path(tmp), prompt, n, args) if args.llama_cpp else "--no-llama-cpp"
        if isinstance(theirs_cpp, str):
            print(json.dumps({"name": "model_decode.llama_cpp", "model": name, "measured": False,
                              "note": theirs_cpp}))
        else:
            engines.update(theirs_cpp)
        _race(name, engines, args)


def _race(name: str, engines: dict, args) -> None:
    """Interleaved runs of every engine; medians and ratios printed as JSON lines (wall-clock rates,
    and rates by CPU time, which the other load on a shared machine moves less: with one thread
    they compare the engines' work per token; with more, a process's CPU time sums its threads)."""
    for fn in engines.values():        # warm-up
        fn()
    wall: dict[str, list[float]] = {k: [] for k in engines}
    cpu: dict[str, list[float]] = {k: [] for k in engines}
    tokens: dict[str, list[int]] = {}
    for _ in range(args.repeats):
        for k, fn in engines.items():
            w, c, tokens[k] = fn()
            wall[k].append(w)
            cpu[k].append(c)
    med = {k: statistics.median(rs) for k, rs in wall.items()}
    med_cpu = {k: statistics.median(rs) for k, rs in cpu.items()}
    base, base_cpu = med["transformers-fp32"], med_cpu["transformers-fp32"]
    targets = {"swarmlm-fp32": 1.5, "swarmlm-int8": 3.5, "swarmlm-int4": 5.0}
    for k in engines:
        print(json.dumps({"name": "model_decode.tokens_per_s", "model": name, "engine": k, "value": round(med[k], 1),
                          "runs": [round(r, 1) for r in wall[k]], "vs_transformers_fp32": round(med[k] / base, 2),
                          "cpu_value": round(med_cpu[k], 1),
                          "cpu_vs_transformers_fp32": round(med_cpu[k] / base_cpu, 2),
                          "target": targets.get(k), "threads": args.threads, "new_tokens": args.new_tokens,
                          "same_tokens_as_transformers": tokens[k] == tokens["transformers-fp32"]}))
    for ours, theirs, target in [("swarmlm-fp32", "llama.cpp-f32", None), ("swarmlm-int8", "llama.cpp-Q8_0", 0.5),
                                 ("swarmlm-int4", "llama.cpp-Q4_0", None)]:
        if theirs in med:
            print(json.dumps({"name": "model_decode.vs_llama_cpp", "model": name, "ours": ours, "theirs": theirs,
                              "ratio": round(med[ours] / med[theirs], 2),
                              "cpu_ratio": round(med_cpu[ours] / med_cpu[theirs], 2), "target": target}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="small,llama23m")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-llama-cpp", dest="llama_cpp", action="store_false", help="skip llama.cpp")
    parser.add_argument("--install-llama-cpp", action="store_true",
                        help="pip install llama-cpp-python first where it is missing (builds from source: minutes)")
    parser.add_argument("--llama-cpp-cache", default=str(Path.home() / ".cache" / "swarmlm-bench"),
                        help="where llama-cpp-python's source (for its converter) is kept")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from swarmlm.model import qkernels
    print(json.dumps({"name": "model_decode.quantized_kernels", "path": qkernels.describe(), "threads": args.threads}))
    for name in args.models.split(","):
        bench_model(name.strip(), args)


if __name__ == "__main__":
    main()
