"""`swarmlm train --config` with a T5 preset: span corruption, and a run that lowers the loss."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from swarmlm.cli import main
from swarmlm.errors import UserError
from swarmlm.model.t5 import PRESETS
from swarmlm.model.t5_generate import generate_t5
from swarmlm.model.t5_hf import load_t5
from swarmlm.train.config import load_run_config
from swarmlm.train.loop import prepare_data
from swarmlm.train.t5_loop import span_corrupt, t5_model_config

CFG = t5_model_config(PRESETS["t5-tiny"], tokenizer_vocab=300, eos_id=0)


def test_span_corruption_hides_spans_behind_sentinels_and_restores_them():
    window = list(range(1, 101))
    inputs, targets = span_corrupt(window, CFG, np.random.default_rng(0))
    assert inputs[-1] == targets[-1] == CFG.eos_token_id
    sentinels = [t for t in inputs if t >= CFG.vocab_size - CFG.n_sentinels]
    assert sentinels == [CFG.sentinel(i) for i in range(len(sentinels))] and len(sentinels) >= 2
    assert len(targets) - 1 - len(sentinels) == 15           # 15% of the window is noise
    # filling each sentinel with its span gives the window back
    spans, current = {}, None
    for t in targets[:-1]:
        if t in sentinels:
            current = spans.setdefault(t, [])
        else:
            current.append(t)
    restored = [x for t in inputs[:-1] for x in (spans[t] if t in spans else [t])]
    assert restored == window


def test_vocabulary_has_pad_and_sentinels_above_the_tokenizer():
    assert CFG.pad_token_id == CFG.decoder_start_token_id == 300
    assert CFG.sentinel(CFG.n_sentinels - 1) > 300 and CFG.vocab_size % 64 == 0


@pytest.fixture()
def corpus(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(30):
        (root / f"m{i}.py").write_text("".join(f"def f{j}(x):\n    return x * {j}\n" for j in range(i, i + 40)))
    return str(root)


def test_t5_preset_training_lowers_the_loss_and_saves_a_checkpoint(tmp_path, corpus, capsys):
    config = tmp_path / "t5.toml"
    config.write_text('[model]\npreset = "t5-tiny"\n[train]\nsteps = 40\nbatch_size = 8\nseq_len = 48\n'
                      'eval_every = 20\nsave_every = 0\nvocab_size = 300\nwarmup_steps = 5\nlr = 5e-3\n')
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--data", corpus, "--out", str(out), "--no-progress"]) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 41))
    first, last = capsys.readouterr().out.split("validation loss ")[1].split(";")[0].split(" → ")
    assert float(last) < float(first) - 1.0
    model, cfg = load_t5(out)
    assert cfg.n_sentinels == PRESETS["t5-tiny"].n_sentinels
    assert len(generate_t5(model, [[5, 6, 7, cfg.sentinel(0), cfg.eos_token_id]], max_new_tokens=4)[0]) >= 1


@pytest.mark.parametrize("flags", [["--swarm", "--run-id", "r"], ["--dp", "2"]])
def test_t5_presets_refuse_the_swarm_and_torchrun_paths(corpus, flags, capsys):
    assert main(["train", "--config", "t5-tiny", "--data", corpus, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert "one process only" in err and "\n" not in err
    with pytest.raises(UserError, match="one process only"):  # what torchrun and the swarm share
        prepare_data(load_run_config("t5-tiny", steps=2), corpus, progress=False)


def test_unknown_t5_field_in_a_config_file(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('[model]\npreset = "t5-tiny"\nn_kv_heads = 2\n')
    with pytest.raises(UserError, match="unknown field 'n_kv_heads'"):
        load_run_config(str(config))
