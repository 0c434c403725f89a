"""T5 checkpoints written by transformers load, decode and generate with transformers' numbers, and back."""

from __future__ import annotations

import json

import pytest
import torch

from swarmlm.cli import main
from swarmlm.errors import CheckpointError, UserError
from swarmlm.model import hf
from swarmlm.model.t5 import PRESETS, T5, relative_bucket, t5_loss
from swarmlm.model.t5_generate import generate_t5
from swarmlm.model.t5_hf import load_t5, load_t5_config, save_t5
from swarmlm.model.tokenizer import Tokenizer
from tests.model.hf_models import T5_VARIANTS, VOCAB, build_t5, rewrite_config

transformers = pytest.importorskip("transformers")


def _ids(B, T, seed, low=2):
    return torch.randint(low, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def _batch(lengths, seed=4):
    """Right-padded prompts of `lengths` (each ending with eos, as T5's tokenizer makes them) and their mask."""
    rows = [_ids(1, n - 1, seed + i)[0].tolist() + [1] for i, n in enumerate(lengths)]
    ids = torch.zeros(len(rows), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, :len(row)], mask[r, :len(row)] = torch.tensor(row), 1
    return rows, ids, mask


@pytest.fixture(params=list(T5_VARIANTS))
def pair(request, tmp_path):
    ref = build_t5(tmp_path, request.param)
    model, cfg = load_t5(tmp_path)
    return ref, model, cfg


def test_relative_buckets_equal_transformers():
    rel = torch.arange(-300, 300)[None]
    attn = transformers.models.t5.modeling_t5.T5Attention
    for bidirectional in (True, False):
        for n, d in ((32, 128), (8, 12)):
            ref = attn._relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=n, max_distance=d)
            assert torch.equal(relative_bucket(rel, bidirectional=bidirectional, n_buckets=n, max_distance=d), ref)


def test_variants_are_read_as_v10_and_v11(pair):
    ref, model, cfg = pair
    v10 = ref.config.feed_forward_proj == "relu"
    assert (cfg.tie_embeddings, cfg.scale_head, cfg.gated) == ((True, True, False) if v10 else (False, False, True))
    assert (model.lm_head.weight is model.embed.weight) == v10
    assert cfg.n_params() == sum(p.numel() for p in model.parameters()) == ref.num_parameters()


@torch.no_grad()
def test_decoder_deeper_than_encoder(tmp_path):
    ref = build_t5(tmp_path, "v1.1", num_decoder_layers=3)
    model, cfg = load_t5(tmp_path)
    assert (cfg.n_layers, cfg.n_decoder_layers) == (2, 3)
    ids, dec = _ids(2, 10, seed=1), _ids(2, 6, seed=2)
    torch.testing.assert_close(model(ids, dec), ref(input_ids=ids, decoder_input_ids=dec).logits,
                               atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_logits_match_transformers_with_padding(pair):
    ref, model, cfg = pair
    _, ids, mask = _batch([30, 17, 9])
    dec = _ids(3, 25, seed=9)
    expected = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    torch.testing.assert_close(model(ids, dec, mask.bool()), expected, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_cached_decoding_equals_teacher_forcing(pair):
    ref, model, cfg = pair
    _, ids, mask = _batch([21, 8])
    dec = _ids(2, 16, seed=11)
    enc = model.encode(ids, mask.bool())
    cache = model.new_cache(enc, mask.bool(), max_len=16)
    steps = [model.decode(dec[:, :4], cross=cache.cross, enc_mask=cache.enc_mask, cache=cache)]
    steps += [model.decode(dec[:, t:t + 1], cross=cache.cross, enc_mask=cache.enc_mask, cache=cache)
              for t in range(4, 16)]
    torch.testing.assert_close(torch.cat(steps, 1), model(ids, dec, mask.bool()), atol=1e-5, rtol=1e-5)


def _hf_rows(out: torch.Tensor, eos: int) -> list[list[int]]:
    rows = []
    for row in out[:, 1:].tolist():  # drop the decoder start token
        rows.append(row[:row.index(eos) + 1] if eos in row else row)
    return rows


@torch.no_grad()
def test_greedy_batch_of_different_lengths_equals_transformers_generate(pair):
    ref, model, cfg = pair
    prompts, ids, mask = _batch([26, 5, 14])
    out = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    expected = _hf_rows(out, cfg.eos_token_id)
    assert len({tuple(r) for r in expected}) == 3 and max(len(r) for r in expected) > 8  # rows differ, not trivial
    assert generate_t5(model, prompts, max_new_tokens=24) == expected
    assert [generate_t5(model, [p], max_new_tokens=24)[0] for p in prompts] == expected  # alone = in a batch


@torch.no_grad()
def test_saved_checkpoint_loads_in_transformers(pair, tmp_path):
    ref, model, cfg = pair
    save_t5(model, cfg, tmp_path / "out", max_shard_bytes=40_000)  # forces shards
    assert (tmp_path / "out" / hf.INDEX_FILE).is_file()
    again = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    _, ids, mask = _batch([12, 7])
    dec = _ids(2, 9, seed=2)
    torch.testing.assert_close(again(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits,
                               model(ids, dec, mask.bool()), atol=1e-4, rtol=1e-4)
    assert load_t5_config(tmp_path / "out") == cfg


def test_t5_tiny_preset_trains_and_round_trips(tmp_path):
    cfg = PRESETS["t5-tiny"].replace(vocab_size=VOCAB)
    torch.manual_seed(0)
    model = T5(cfg)
    x, labels = _ids(4, 12, seed=1), _ids(4, 6, seed=2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = t5_loss(model, x, None, labels).item()
    for _ in range(15):
        loss = t5_loss(model, x, None, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 1.0
    save_t5(model, cfg, tmp_path)
    again, cfg2 = load_t5(tmp_path)
    assert cfg2 == cfg
    with torch.no_grad():
        torch.testing.assert_close(again(x, labels), model(x, labels))


# ---- the CLI and bad input ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("t5cli")
    tok = Tokenizer.train_bpe(["the quick brown fox jumps over the lazy dog " * 20], vocab_size=280)
    ref = build_t5(directory, "v1.1", vocab_size=VOCAB, eos_token_id=tok.eos_id)
    tok.save(directory)
    return directory, ref, tok


def test_generate_cli_runs_t5_and_matches_transformers(t5_dir, capsys):
    directory, ref, tok = t5_dir
    assert main(["generate", str(directory), "--prompt", "the lazy fox", "--max-new-tokens", "12",
                 "--temperature", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    prompt = tok.encode("the lazy fox") + [tok.eos_id]
    assert out["prompt_ids"] == prompt
    expected = ref.generate(input_ids=torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    assert out["output_ids"] == _hf_rows(expected, tok.eos_id)[0]


def test_serving_or_loading_t5_as_decoder_only_is_a_one_line_error(t5_dir, capsys):
    directory, _, _ = t5_dir
    with pytest.raises(CheckpointError, match="T5 .encoder-decoder. checkpoints run with `generate` and `train` only"):
        hf.load_config(directory)
    assert main(["serve", str(directory), "--host", "127.0.0.1", "--blocks", "0:1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "T5 (encoder-decoder)" in err and "\n" not in err


@pytest.mark.parametrize("changes, message", [
    (dict(model_type="mt5", architectures=["MT5ForConditionalGeneration"]), "unsupported T5 variant"),
    (dict(architectures=["T5EncoderModel"]), "unsupported T5 variant"),
    (dict(feed_forward_proj="gated-swishy"), "unsupported feed_forward_proj"),
    (dict(feed_forward_proj="a-b-c"), "unsupported feed_forward_proj"),
    (dict(relative_attention_num_buckets=2), "n_buckets >= 4"),
    (dict(d_ff=65), r"has shape \(65, 32\)|has shape \(64, 32\)"),
    (dict(num_heads=None), "no 'num_heads'"),
])
def test_bad_t5_configs_are_one_line_errors(tmp_path, changes, message):
    build_t5(tmp_path, "v1.0")
    rewrite_config(tmp_path, **changes)
    with pytest.raises(CheckpointError, match=message):
        load_t5(tmp_path)


def test_generate_cli_on_an_unsupported_t5_is_one_line(t5_dir, tmp_path, capsys):
    directory, _, _ = t5_dir
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in directory.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    rewrite_config(bad, feed_forward_proj="gated-swishy")
    assert main(["generate", str(bad), "--prompt", "the fox", "--json"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unsupported feed_forward_proj 'gated-swishy'" in err and "\n" not in err


def test_untied_config_without_a_head_is_an_error(tmp_path):
    build_t5(tmp_path, "v1.0")
    rewrite_config(tmp_path, tie_word_embeddings=False)
    with pytest.raises(CheckpointError, match="no lm_head.weight"):
        load_t5(tmp_path)


def test_bad_prompts_and_configs(pair):
    _, model, cfg = pair
    with pytest.raises(UserError, match="at least one token"):
        generate_t5(model, [[5], []], max_new_tokens=3)
    with pytest.raises(UserError, match="outside the vocabulary"):
        generate_t5(model, [[VOCAB + 3]], max_new_tokens=3)
    with pytest.raises(UserError, match="unsupported T5 activation"):
        cfg.replace(activation="tanh").validate()
    with pytest.raises(UserError, match="tie_embeddings == scale_head"):
        save_t5(model, cfg.replace(scale_head=not cfg.scale_head), "/nonexistent/never")
