"""Chat: the prompt rendered equals transformers' apply_chat_template, and the greedy reply equals its generate."""

import json
import shutil

import pytest
import torch

from swarmlm.api.backends import LocalBackend
from swarmlm.api.chat import ChatTemplate
from swarmlm.api.run import build_app
from tests.api.conftest import RunningApi
from tests.helpers.swarm_servers import local_model

TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = 'you are tiny.' %}{% endif %}\n"
    "<sys> {{ system | trim }}\n"
    "{% for message in messages %}\n"
    "    {% if message['role'] not in ['user', 'assistant'] %}{{ raise_exception('unknown role') }}{% endif %}\n"
    "<{{ message['role'] }}> {{ message['content'] | trim }}{{ eos_token }}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
MESSAGES = [{"role": "system", "content": "  be brief. "}, {"role": "user", "content": "the quick brown fox"},
            {"role": "assistant", "content": "jumps"}, {"role": "user", "content": "over the lazy dog"}]


@pytest.fixture(scope="module")
def chat_ckpt(ckpt, tmp_path_factory):
    directory = tmp_path_factory.mktemp("chat") / "tiny-chat"
    shutil.copytree(ckpt, directory)
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return directory


@pytest.fixture(scope="module")
def chat_api(chat_ckpt):
    running = RunningApi(build_app(LocalBackend(local_model(chat_ckpt)), chat_ckpt, "tiny-chat", api_key=None,
                                   eos_id=None))
    yield running
    running.close()


def test_rendered_prompt_equals_transformers_apply_chat_template(chat_ckpt):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(chat_ckpt)

    ours = ChatTemplate.load(chat_ckpt).render(MESSAGES, add_generation_prompt=True)

    assert ours == hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert ours.endswith("<assistant>") and "<|endoftext|>" in ours


def test_a_template_that_raises_is_a_400(chat_api):
    from openai import BadRequestError, OpenAI
    client = OpenAI(base_url=chat_api.url, api_key="x", max_retries=0)
    with pytest.raises(BadRequestError) as e:
        client.chat.completions.create(model="tiny-chat", messages=[{"role": "tool", "content": "x"}])
    assert "unknown role" in e.value.message


def test_greedy_chat_reply_equals_transformers_generate(chat_api, chat_ckpt):
    from openai import OpenAI
    from transformers import AutoModelForCausalLM, AutoTokenizer
    hf_tok = AutoTokenizer.from_pretrained(chat_ckpt)
    hf_model = AutoModelForCausalLM.from_pretrained(chat_ckpt).eval()
    ids = hf_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True,
                                     return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = hf_model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=hf_tok.eos_token_id,
                                pad_token_id=hf_tok.eos_token_id)
    new = [t for t in out[0, ids.shape[1]:].tolist()]
    if hf_tok.eos_token_id in new:
        new = new[:new.index(hf_tok.eos_token_id)]
    expected = hf_tok.decode(new)
    client = OpenAI(base_url=chat_api.url, api_key="x", max_retries=0)

    reply = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=16, temperature=0)
    streamed = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=16, temperature=0,
                                              stream=True)

    assert reply.choices[0].message.content == expected
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == ids.shape[1]
    chunks = list(streamed)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
