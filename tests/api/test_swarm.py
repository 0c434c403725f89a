"""The API in front of a 2-server in-process swarm: the same text as `swarmlm generate`, a session per
request, and a client killed mid-stream leaves no session on the servers."""

import asyncio
import json
import socket
import threading

import pytest

from swarmlm.api.backends import SwarmBackend
from swarmlm.api.run import build_app
from swarmlm.swarm.client.session import InferenceSession
from swarmlm.swarm.server import serve as serve_module
from swarmlm.swarm.server.host import BlockHost
from tests.api.conftest import RunningApi
from tests.api.test_completions import PROMPT, generate_cli
from tests.helpers.swarm import poll_until
from tests.helpers.swarm_servers import InProcessSwarm


@pytest.fixture()
def hosts(monkeypatch):
    """Every BlockHost the servers start, to read their open session counts."""
    made = []

    class Recorded(BlockHost):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(serve_module, "BlockHost", Recorded)
    return made


@pytest.fixture()
def swarm_api(ckpt, hosts):
    swarm = InProcessSwarm()
    swarm.add_server(ckpt, (0, 2))
    swarm.add_server(ckpt, (2, 4))
    remote = swarm.remote_model(ckpt)
    running = RunningApi(build_app(SwarmBackend(remote), ckpt, "tiny-llama", api_key=None, eos_id=None))
    yield running
    running.close()
    swarm.close()


def open_sessions(hosts):
    return sum(h.n_sessions for h in hosts)


def openai_client(url):
    from openai import OpenAI
    return OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60)


def test_greedy_completion_through_two_servers_equals_swarmlm_generate(swarm_api, ckpt, hosts, capsys):
    expected = generate_cli(ckpt, PROMPT, 20, capsys)
    client = openai_client(swarm_api.url)

    out = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=20, temperature=0,
                                            stream=True))

    assert out.choices[0].text == expected["text"]
    assert out.usage.completion_tokens == len(expected["output_ids"])
    assert "".join(c.choices[0].text for c in chunks) == expected["text"]
    assert len(hosts) == 2 and open_sessions(hosts) == 0


def test_concurrent_requests_each_get_their_own_session(swarm_api, hosts):
    client = openai_client(swarm_api.url)
    prompts = ["the quick", "a swarm of", "lazy dog", "machines run"]
    expected = [client.completions.create(model="tiny-llama", prompt=p, max_tokens=16, temperature=0).choices[0].text
                for p in prompts]
    results = [None] * len(prompts)
    start = threading.Barrier(len(prompts))

    def ask(i):
        start.wait()
        stream = client.completions.create(model="tiny-llama", prompt=prompts[i], max_tokens=16, temperature=0,
                                           stream=True)
        results[i] = "".join(c.choices[0].text for c in stream)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)

    assert results == expected
    assert open_sessions(hosts) == 0


def test_a_client_killed_mid_stream_leaves_no_session(swarm_api, hosts, monkeypatch):
    entered_stuck_step = threading.Event()
    original_step = InferenceSession.step

    async def step(self, *args, **kwargs):
        if self.n_steps_taken >= 3:                 # from the fourth step on, a step never ends by itself
            entered_stuck_step.set()
            await asyncio.Event().wait()
        self.n_steps_taken += 1
        return await original_step(self, *args, **kwargs)

    monkeypatch.setattr(InferenceSession, "n_steps_taken", 0, raising=False)
    monkeypatch.setattr(InferenceSession, "step", step)
    host, port = swarm_api.url.split("//")[1].split("/")[0].split(":")
    body = json.dumps({"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 100, "temperature": 0,
                       "stream": True}).encode()
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    received = b""
    while b"data: " not in received:
        received += sock.recv(4096)
    assert entered_stuck_step.wait(20)
    assert open_sessions(hosts) == 2                # one per server, mid-generation

    sock.close()                                    # the client is gone

    assert poll_until(lambda: open_sessions(hosts) == 0 and swarm_api.api.active == 0, 20, every_s=0.01)


def test_a_swarm_that_no_longer_covers_the_model_answers_503_and_the_server_goes_on(ckpt, hosts):
    swarm = InProcessSwarm()
    swarm.add_server(ckpt, (0, 2))
    second_half = swarm.add_server(ckpt, (2, 4))
    remote = swarm.remote_model(ckpt)
    running = RunningApi(build_app(SwarmBackend(remote), ckpt, "tiny-llama", api_key=None, eos_id=None))
    try:
        from openai import APIStatusError
        client = openai_client(running.url)
        swarm.stop_server(second_half)                  # blocks 2:4 are served by nobody now
        with pytest.raises(APIStatusError) as failed:
            client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=4, temperature=0)
        assert failed.value.status_code == 503
        assert failed.value.body["code"] == "swarm_unavailable" and "blocks 2..3" in failed.value.body["message"]
        assert [m.id for m in client.models.list().data] == ["tiny-llama"]          # still serving
    finally:
        running.close()
        swarm.close()
