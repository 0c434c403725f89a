"""Bad requests get OpenAI's error JSON with the right status, and the server keeps serving."""

import json
import urllib.error
import urllib.request

import openai
import pytest

from swarmlm.api.backends import LocalBackend
from swarmlm.api.run import build_app
from swarmlm.api.server import MAX_BODY_BYTES
from tests.api.conftest import RunningApi
from tests.helpers.swarm_servers import local_model


def post(url, body, *, headers=None):
    """(status, parsed JSON) of a raw POST; `body` bytes are sent as they are."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def assert_openai_error(status, body, expected_status, param=None, code=None):
    assert status == expected_status
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param
    if code is not None:
        assert body["error"]["code"] == code


@pytest.mark.parametrize("body, param", [
    ({"model": "tiny-llama"}, "prompt"),
    ({"prompt": "hi"}, "model"),
    ({"model": "tiny-llama", "prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
    ({"model": "tiny-llama", "prompt": "hi", "max_tokens": -1}, "max_tokens"),
    ({"model": "tiny-llama", "prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"model": "tiny-llama", "prompt": "hi", "top_p": 0}, "top_p"),
    ({"model": "tiny-llama", "prompt": "hi", "stop": [1, 2]}, "stop"),
    ({"model": "tiny-llama", "prompt": "hi", "stream": "yes"}, "stream"),
    ({"model": "tiny-llama", "prompt": 42}, "prompt"),
    ({"model": "tiny-llama", "prompt": "hi", "n": 2}, "n"),
])
def test_malformed_completion_requests_are_400(local_api, body, param):
    status, out = post(local_api.url + "/completions", body)
    assert_openai_error(status, out, 400, param=param)


@pytest.mark.parametrize("body, param", [
    ({"model": "tiny-llama"}, "messages"),
    ({"model": "tiny-llama", "messages": "hello"}, "messages"),
    ({"model": "tiny-llama", "messages": [{"content": "no role"}]}, None),
])
def test_malformed_chat_requests_are_400(local_api, body, param):
    status, out = post(local_api.url + "/chat/completions", body)
    assert_openai_error(status, out, 400, param=param)


def test_a_body_that_is_not_json_is_400(local_api):
    status, out = post(local_api.url + "/completions", b"{not json")
    assert_openai_error(status, out, 400)


def test_an_oversized_body_is_413(local_api):
    body = b'{"model": "tiny-llama", "prompt": "' + b"a" * (MAX_BODY_BYTES + 10) + b'"}'
    status, out = post(local_api.url + "/completions", body)
    assert_openai_error(status, out, 413, code="body_too_large")


def test_unknown_model_is_404_model_not_found(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert e.value.code == "model_not_found"


def test_negative_max_tokens_through_the_client_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-llama", prompt="hi", max_tokens=-5)
    assert e.value.param == "max_tokens"


def test_a_prompt_longer_than_the_context_is_context_length_exceeded(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-llama", prompt=[1] * 129, max_tokens=1)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-llama", prompt=[1] * 100, max_tokens=40)
    assert e.value.code == "context_length_exceeded"


def test_chat_without_a_template_is_a_clear_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}])
    assert "chat template" in e.value.message and e.value.code == "no_chat_template"


def test_the_server_keeps_serving_after_bad_requests(local_api, client):
    for body in ({}, {"model": "tiny-llama", "prompt": None}, [1, 2]):
        post(local_api.url + "/completions", body)
    out = client.completions.create(model="tiny-llama", prompt="hello", max_tokens=3, temperature=0)
    assert out.usage.completion_tokens == 3


@pytest.fixture(scope="module")
def keyed_api(ckpt):
    running = RunningApi(build_app(LocalBackend(local_model(ckpt)), ckpt, "tiny-llama", api_key="sekrit",
                                   eos_id=None))
    yield running
    running.close()


def test_a_wrong_key_is_401_and_the_right_one_is_served(keyed_api):
    wrong = openai.OpenAI(base_url=keyed_api.url, api_key="guess", max_retries=0)
    right = openai.OpenAI(base_url=keyed_api.url, api_key="sekrit", max_retries=0)

    with pytest.raises(openai.AuthenticationError) as e:
        wrong.completions.create(model="tiny-llama", prompt="hi", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()

    assert e.value.code == "invalid_api_key"
    # greedy: a sampled token may be eos (the tokenizer's, the app's default) and end at one token
    assert right.completions.create(model="tiny-llama", prompt="hi", max_tokens=2,
                                    temperature=0).usage.completion_tokens == 2
