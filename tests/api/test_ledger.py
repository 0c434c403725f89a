"""`swarmlm api --swarm --ledger`: a server's refusal (quota, deposit, priority) is HTTP 429 with the
refusal's one line in OpenAI's error body; each session's ticket pays for its own request's max_tokens.
(End to end through a real server and chain: tests/ledger/test_enforce.py.)"""

import asyncio
import threading

import openai
import pytest

from swarmlm.api.backends import SwarmBackend
from swarmlm.api.run import build_app
from swarmlm.cli import main
from swarmlm.errors import AccessRefused
from swarmlm.swarm.client.model import LoopThread
from tests.api.conftest import RunningApi
from tests.api.test_errors import assert_openai_error, post

REFUSAL = ("access refused: quota exceeded: 10 tokens left here this epoch (quota 50 over 1 server(s), deposit 0 "
           "wei), 40 asked; renews in 3000 s (epoch 2)")


class WatchedLock(asyncio.Lock):
    """The backend's opening lock, counting the requests waiting on it and saying so to another thread."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = 0
        self.changed = threading.Condition()

    def _count(self, step: int) -> None:
        with self.changed:
            self.waiting += step
            self.changed.notify_all()

    async def acquire(self) -> bool:
        if not self.locked():
            return await super().acquire()
        self._count(1)
        try:
            return await super().acquire()
        finally:
            self._count(-1)


class FakeRemote:
    """What SwarmBackend uses of a RemoteModel: sessions that refuse, or yield `n` tokens, on their own loop."""

    def __init__(self, refuse: str | None, log: list):
        self.runner = LoopThread()
        self.cfg = type("Cfg", (), {"context_len": 64})()
        self.refuse, self.log = refuse, log
        self.open_now = 0
        self.openings_expected, self.opened = 1, 0
        self.backend = None             # the SwarmBackend, whose openings lock the test watches

    async def _others_queued(self) -> None:
        """Wait (bounded) until every request not yet opened waits on the backend's opening lock: so an
        opening is still under way while the others have arrived, and one that did not take turns would
        be seen at once (open_now). The lock says when a request starts or stops waiting on it."""
        want = self.openings_expected - self.opened
        if want <= 0:
            return
        lock = self.backend._opening

        def wait() -> bool:
            with lock.changed:
                return lock.changed.wait_for(lambda: lock.waiting >= want, 30)

        if not await asyncio.to_thread(wait):
            raise AssertionError(f"{want} more requests never queued behind this opening")

    async def generate_steps(self, prompts, *, max_new_tokens, **kw):
        self.log.append(("open", max_new_tokens, threading.current_thread().name))
        self.open_now += 1
        self.opened += 1
        try:
            assert self.open_now == 1, "two sessions opening at once"
            await self._others_queued()
            if self.refuse:
                raise AccessRefused(self.refuse + "\n(a detail line the client never shows)")
        finally:
            self.open_now -= 1
        for i in range(max_new_tokens):
            yield [5 + i]


@pytest.fixture()
def api_with(ckpt):
    running = []

    def make(refuse, log):
        paid = []
        remote = FakeRemote(refuse, log)
        backend = remote.backend = SwarmBackend(remote, pay_for=lambda n: (paid.append(n), log.append(("pay", n))))
        backend._opening = WatchedLock()
        api = RunningApi(build_app(backend, ckpt, "tiny-llama", api_key=None, eos_id=None))
        running.append((api, remote))
        make.last_remote = remote
        return api, paid

    yield make
    for api, remote in running:
        api.close()
        remote.runner.close()


@pytest.mark.parametrize("stream", [False, True])
def test_a_refused_session_is_429_with_the_one_line_reason(api_with, stream):
    api, _ = api_with(REFUSAL, [])
    status, body = post(api.url + "/completions", {"model": "tiny-llama", "prompt": "hi", "max_tokens": 40,
                                                   "stream": stream})
    assert_openai_error(status, body, 429, code="access_refused")
    assert body["error"]["message"] == REFUSAL and body["error"]["type"] == "insufficient_quota"
    status, body = post(api.url + "/chat/completions", {"model": "tiny-llama", "max_tokens": 4,
                                                        "messages": [{"role": "user", "content": "hi"}]})
    assert status in (400, 429)              # the tiny checkpoint may have no chat template: 400 before any session


def test_the_openai_client_sees_a_rate_limit_error_and_the_server_keeps_serving(api_with):
    api, _ = api_with("access refused: server busy, priority slot holders only (load 75%); quota left 50 tokens "
                      "here; renews in 10 s (epoch 1)", [])
    with openai.OpenAI(base_url=api.url, api_key="unused", max_retries=0, timeout=60) as client:
        for _ in range(2):
            with pytest.raises(openai.RateLimitError) as e:
                client.completions.create(model="tiny-llama", prompt="hi", max_tokens=3)
            assert e.value.status_code == 429 and "priority slot holders only" in e.value.message
            assert e.value.body["type"] == "requests"


def test_each_session_pays_for_its_own_request_and_openings_take_turns(api_with):
    log: list = []
    api, paid = api_with(None, log)
    api_with.last_remote.openings_expected = 3     # the first opening waits until the other two queue
    results = []

    def ask(n):
        results.append(post(api.url + "/completions", {"model": "tiny-llama", "prompt": "hi", "max_tokens": n}))

    threads = [threading.Thread(target=ask, args=(n,)) for n in (3, 7, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [s for s, _ in results] == [200, 200, 200]
    assert sorted(paid) == [3, 5, 7]
    order = [e for e in log if e[0] in ("pay", "open")]
    assert all(order[i][0] == "pay" and order[i + 1][:2] == ("open", order[i][1]) for i in range(0, 6, 2)), order
    assert sorted(r["usage"]["completion_tokens"] for _, r in results) == [3, 5, 7]


def test_ledger_without_swarm_is_one_line_and_exit_2(ckpt, capsys):
    assert main(["api", str(ckpt), "--ledger", "0x" + "11" * 20]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "add --swarm" in err[0]
