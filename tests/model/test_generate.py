"""Sampling, batched left-padded generation, eos, and the `swarmlm generate` command."""

from __future__ import annotations

import json

import pytest
import torch

from swarmlm.cli import main
from swarmlm.errors import UserError
from swarmlm.model.config import PRESETS
from swarmlm.model.generate import generate, sample_next, stream_generate
from swarmlm.model.hf import save_model
from swarmlm.model.tokenizer import Tokenizer
from swarmlm.model.transformer import Transformer

TINY = PRESETS["tiny"].replace(vocab_size=300, n_layers=2, max_seq_len=64)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(TINY).eval()


def test_temperature_zero_is_argmax():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_next(logits, temperature=0), logits.argmax(-1))


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, temperature=1.0, top_k=1, generator=g), logits.argmax(-1))
    assert torch.equal(sample_next(logits, temperature=1.0, top_p=1e-6, generator=g), logits.argmax(-1))


def test_sampling_stays_in_top_k_and_repeats_with_the_seed():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(2)).expand(200, 50)
    top = set(torch.topk(logits[0], 5).indices.tolist())
    a = sample_next(logits, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(7))
    b = sample_next(logits, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and set(a.tolist()) <= top and len(set(a.tolist())) > 1


def test_left_padded_batch_generates_what_each_row_does_alone(model):
    prompts = [[5, 17, 42, 9, 100, 3], [250], [7, 7, 8]]
    batch = generate(model, prompts, max_new_tokens=12)
    assert batch == [generate(model, p, max_new_tokens=12) for p in prompts]


def test_rows_stop_at_their_first_eos(model):
    free = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=10)
    eos = free[0][3]
    stopped = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=10, eos_id=eos)
    for row, full in zip(stopped, free):
        end = full.index(eos) + 1 if eos in full else len(full)
        assert row == full[:end]


def test_stream_yields_one_token_per_row_per_step(model):
    steps = list(stream_generate(model, [[1, 2], [3]], max_new_tokens=4))
    assert len(steps) == 4 and all(len(s) == 2 and None not in s for s in steps)


def test_sampled_generation_repeats_with_the_same_seed(model):
    a = generate(model, [1, 2, 3], max_new_tokens=8, temperature=1.0, seed=5)
    assert a == generate(model, [1, 2, 3], max_new_tokens=8, temperature=1.0, seed=5)


def test_prompt_longer_than_context_is_a_user_error(model):
    with pytest.raises(UserError, match="longer than the model's context of 64"):
        generate(model, list(range(65)), max_new_tokens=1)


def test_generation_stops_at_the_context_end(model):
    assert len(generate(model, list(range(60)), max_new_tokens=10)) == 4


# ---- CLI ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = Tokenizer.train_bpe(["hello world, the quick brown fox jumps over the lazy dog"] * 20, vocab_size=300)
    cfg = TINY.replace(vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, max_seq_len=16)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("ckpt")
    save_model(Transformer(cfg), cfg, directory, tokenizer=tok)
    return directory


def test_cli_json_prints_one_object(model_dir, capsys):
    rc = main(["generate", str(model_dir), "--prompt", "hello world", "--max-new-tokens", "5",
               "--temperature", "0", "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(out) == 1
    result = json.loads(out[0])
    assert set(result) >= {"prompt_ids", "output_ids", "text", "tokens_per_s"}
    assert result["prompt_ids"] == Tokenizer.load(model_dir).encode("hello world")
    assert 1 <= len(result["output_ids"]) <= 5


def test_cli_streams_text(model_dir, capsys):
    rc = main(["generate", str(model_dir), "--prompt", "the quick", "--max-new-tokens", "4", "--temperature", "0"])
    assert rc == 0 and capsys.readouterr().out.endswith("\n")


@pytest.mark.parametrize("case", ["too_long", "missing", "truncated"])
def test_cli_bad_input_exits_2_with_one_line(model_dir, tmp_path, capsys, case):
    target, prompt = str(model_dir), "hello"
    if case == "too_long":
        prompt = "the quick brown fox " * 20
    elif case == "missing":
        target = str(tmp_path / "nope")
    else:
        import shutil
        shutil.copytree(model_dir, tmp_path / "ckpt")
        weights = tmp_path / "ckpt" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-64])
        target = str(tmp_path / "ckpt")
    rc = main(["generate", target, "--prompt", prompt, "--json"])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and "error" in captured.err


def test_token_loop_driven_by_hand_equals_stream_generate(model):
    from swarmlm.model.cache import KVCache
    from swarmlm.model.generate import TokenLoop, local_step

    prompts = [[5, 6, 7], [9]]
    cache = KVCache.empty(model.cfg, 2, 3 + 6)
    step = local_step(model, cache)
    loop = TokenLoop(prompts, max_new_tokens=6, eos_id=None)
    rows = []
    assert loop.key_mask is not None                 # the first step is the padded prompts
    while not loop.finished:
        rows.append(loop.take(step(loop.ids, loop.key_mask)))
        assert loop.key_mask is None and loop.ids.shape == (2, 1)
    assert rows == list(stream_generate(model, prompts, max_new_tokens=6))
    assert loop.steps == 6 and loop.last


def test_token_loop_with_no_tokens_to_make_is_finished_at_once():
    from swarmlm.model.generate import TokenLoop

    assert TokenLoop([[1, 2]], max_new_tokens=0).finished
