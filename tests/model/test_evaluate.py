"""`swarmlm eval`: perplexity over non-overlapping windows, equal to transformers' for fp32 checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch

from swarmlm.cli import main
from swarmlm.errors import UserError
from swarmlm.model.evaluate import windows
from swarmlm.model.tokenizer import Tokenizer
from tests.model.hf_models import VOCAB, build_hf

transformers = pytest.importorskip("transformers")

TEXT = ("the quick brown fox jumps over the lazy dog; " * 30 + "a swarm of small machines runs one model. " * 30)


def _hf_perplexity(ref, ids: list[int], window: int) -> tuple[int, float]:
    """The same rule with transformers: each window's mean loss (labels = inputs) times its scored tokens."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids), window):
            chunk = ids[i:i + window]
            if len(chunk) < 2:
                continue
            x = torch.tensor([chunk])
            loss = ref(input_ids=x, labels=x).loss
            total += float(loss) * (len(chunk) - 1)
            count += len(chunk) - 1
    return count, total / count


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "held_out.txt"
    path.write_text(TEXT)
    return path


@pytest.mark.parametrize("variant", ["llama3", "gpt2", "qwen2"])
def test_eval_equals_transformers_perplexity(tmp_path, capsys, text_file, variant):
    ref = build_hf(tmp_path, variant)
    Tokenizer.train_bpe([TEXT], vocab_size=VOCAB - 8).save(tmp_path)
    ids = Tokenizer.load(tmp_path).encode(TEXT)
    window = 50
    assert len(ids) % window >= 2           # a shorter last window is scored too
    tokens, nll = _hf_perplexity(ref, ids, window)
    assert main(["eval", str(tmp_path), "--data", str(text_file), "--window", str(window), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == tokens == len(ids) - len(windows(ids, window))
    assert out["nll"] == pytest.approx(nll, rel=1e-4)
    assert out["perplexity"] == pytest.approx(math.exp(nll), rel=1e-4)


def test_eval_default_window_is_the_context(tmp_path, capsys, text_file):
    ref = build_hf(tmp_path, "llama3")       # max_position_embeddings 128
    Tokenizer.train_bpe([TEXT], vocab_size=VOCAB - 8).save(tmp_path)
    ids = Tokenizer.load(tmp_path).encode(TEXT)
    tokens, nll = _hf_perplexity(ref, ids, 128)
    assert main(["eval", str(tmp_path), "--data", str(text_file), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["window"] == 128 and out["tokens"] == tokens
    assert out["perplexity"] == pytest.approx(math.exp(nll), rel=1e-4)


def test_windows_drop_only_a_last_single_token():
    assert windows(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5]]
    assert windows(list(range(8)), 3) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    with pytest.raises(UserError, match="at least 2"):
        windows([1, 2, 3], 1)


def test_eval_bad_input_is_one_line(tmp_path, capsys, text_file):
    build_hf(tmp_path, "llama3")
    Tokenizer.train_bpe([TEXT], vocab_size=VOCAB - 8).save(tmp_path)
    capsys.readouterr()                      # transformers' own progress output
    cases = [(["--data", str(tmp_path / "missing.txt")], "not a file"),
             (["--data", str(text_file), "--window", "999"], "longer than the model's context"),
             (["--data", str(text_file), "--quantize", "int3"], "unknown quantization"),
             (["--data", str(text_file), "--quantize", "int4-g48"], "group size must be one of")]
    for extra, message in cases:
        assert main(["eval", str(tmp_path), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_quantization_costs_little_perplexity_on_a_trained_tiny_model(tmp_path, capsys):
    import sysconfig
    from pathlib import Path

    lib = Path(sysconfig.get_paths()["stdlib"])
    (tmp_path / "train.txt").write_text("\n".join((lib / f).read_text() for f in ("textwrap.py", "shlex.py",
                                                                                   "argparse.py")))
    (tmp_path / "held_out.txt").write_text((lib / "dataclasses.py").read_text())
    run = tmp_path / "run"
    assert main(["train", "--config", "tiny", "--data", str(tmp_path / "train.txt"), "--steps", "60",
                 "--batch-size", "8", "--seq-len", "64", "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    ppl = {}
    for scheme in ("none", "int8", "int4"):
        assert main(["eval", str(run), "--data", str(tmp_path / "held_out.txt"), "--quantize", scheme, "--json"]) == 0
        ppl[scheme] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"]
    assert ppl["none"] < 4096 / 2                      # trained: well below a uniform guess over the vocabulary
    assert abs(ppl["int8"] / ppl["none"] - 1) < 0.01
    assert abs(ppl["int4"] / ppl["none"] - 1) < 0.05
    assert ppl["int4"] != ppl["int8"] != ppl["none"]
