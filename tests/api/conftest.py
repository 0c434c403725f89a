"""Fixtures for the API tests: a tiny checkpoint, and the API served on 127.0.0.1 from a background loop."""

import asyncio
from pathlib import Path

import pytest

from swarmlm.api.backends import LocalBackend
from swarmlm.api.run import build_app
from swarmlm.api.server import serve
from swarmlm.swarm.client.model import LoopThread
from tests.helpers.swarm_servers import build_checkpoint, local_model


class RunningApi:
    """`serve(app)` on a LoopThread; `.url` is the base URL once it accepts connections."""

    def __init__(self, api, *, host: str = "127.0.0.1"):
        self.api = api
        self.runner = LoopThread()
        self.stop = None
        ready = self.runner.loop.create_future()

        async def start():
            self.stop = asyncio.Event()
            return asyncio.ensure_future(serve(api.app, host, 0, stop=self.stop, on_ready=ready.set_result))

        self.task = self.runner.run(start())
        self.url = self.runner.run(asyncio.wait_for(asyncio.shield(ready), 30))

    def close(self):
        async def go():
            self.stop.set()
            await self.task
        self.runner.run(go(), timeout_s=30)
        self.runner.close()


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("api-ckpt") / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def local_api(ckpt):
    running = RunningApi(build_app(LocalBackend(local_model(ckpt)), ckpt, "tiny-llama", api_key=None, eos_id=None))
    yield running
    running.close()


@pytest.fixture()
def client(local_api):
    from openai import OpenAI
    with OpenAI(base_url=local_api.url, api_key="unused", max_retries=0, timeout=60) as c:
        yield c
