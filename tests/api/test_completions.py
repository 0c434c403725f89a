"""/v1/models and /v1/completions through the official openai client: the same text as `swarmlm generate`."""

import json

import pytest

from swarmlm.api.text import cut_at_stop
from swarmlm.cli import main
from swarmlm.model.generate import generate
from swarmlm.model.tokenizer import Tokenizer
from tests.helpers.swarm_servers import local_model

PROMPT = "the quick brown fox"


def generate_cli(ckpt, prompt, n, capsys):
    assert main(["generate", str(ckpt), "--prompt", prompt, "--max-new-tokens", str(n), "--temperature", "0",
                 "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-llama"]


def test_greedy_completion_equals_swarmlm_generate(client, ckpt, capsys):
    expected = generate_cli(ckpt, PROMPT, 20, capsys)

    out = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=20, temperature=0)

    assert out.choices[0].text == expected["text"]
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(expected["prompt_ids"]) == len(Tokenizer.load(ckpt).encode(PROMPT))
    assert out.usage.completion_tokens == len(expected["output_ids"]) == 20


def test_streamed_chunks_concatenate_to_the_whole_text(client):
    whole = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=24, temperature=0)

    chunks = list(client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))

    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_token_id_prompts_are_accepted(client, ckpt):
    ids = Tokenizer.load(ckpt).encode(PROMPT)
    out = client.completions.create(model="tiny-llama", prompt=ids, max_tokens=8, temperature=0)
    assert out.choices[0].text == Tokenizer.load(ckpt).decode(generate(local_model(ckpt), ids, max_new_tokens=8))


def test_stop_cuts_where_openai_does(client):
    whole = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=30, temperature=0).choices[0].text
    stop = whole[7:10]                                    # a string the greedy output does contain
    expected, _ = cut_at_stop(whole, [stop])

    out = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop])
    streamed = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=30, temperature=0,
                                         stop=[stop, "never appears"], stream=True)

    assert out.choices[0].text == expected and stop not in out.choices[0].text
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens < 30
    chunks = [c.choices[0] for c in streamed]
    assert "".join(c.text for c in chunks) == expected
    assert chunks[-1].finish_reason == "stop"


def test_same_seed_samples_the_same_text(client):
    a = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    b = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    assert a.choices[0].text == b.choices[0].text
