"""The web app on 127.0.0.1: the page and its shipped assets, /api/swarm, the event stream, bad paths;
and the command's one-line errors."""

import asyncio
import json
import re
import urllib.error
import urllib.request

import pytest

from swarmlm.dashboard.app import ASSETS, build_app
from swarmlm.dashboard.collect import Collector
from swarmlm.dashboard.run import serve
from swarmlm.p2p.memory import MemoryNetwork, MemoryPeer
from tests.helpers.swarm import LoopThread, run_cli


class Static:
    name = "static"

    async def collect(self, peer, now):
        return {"static": {"n": 1}}


@pytest.fixture(scope="module")
def running():
    loop = LoopThread()
    state = {}

    async def start():
        collector = Collector(await MemoryPeer.create(MemoryNetwork(), client_mode=True), [Static()])
        await collector.refresh()
        stop, ready = asyncio.Event(), asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(serve(build_app(collector), "127.0.0.1", 0, stop=stop, on_ready=ready.set_result))
        state.update(collector=collector, stop=stop, task=task)
        return await asyncio.wait_for(ready, 30)

    url = loop.run(start())
    yield url, state, loop

    async def finish():
        state["stop"].set()
        await state["task"]
    loop.run(finish())
    loop.close()


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers["content-type"], r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["content-type"], e.read()


def test_the_page_and_only_its_shipped_assets_are_served(running):
    url, _, _ = running
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", url)
    status, kind, body = get(url)
    assert status == 200 and kind.startswith("text/html") and b"/static/dash.js" in body
    for name in ASSETS:
        status, _, body = get(url + "static/" + name)
        assert status == 200 and body
        outside = body.replace(b"http://www.w3.org/2000/svg", b"")      # a namespace name, never fetched
        assert b"http://" not in outside and b"https://" not in outside and b"//cdn" not in outside
    for bad in ("static/nothing.js", "static/..%2Frun.py", "static/%2e%2e/app.py", "api/nothing"):
        assert get(url + bad)[0] == 404, bad


def test_api_swarm_is_the_latest_snapshot(running):
    url, _, _ = running
    status, kind, body = get(url + "api/swarm")
    snap = json.loads(body)
    assert status == 200 and kind == "application/json"
    assert snap["static"] == {"n": 1} and snap["panels"] == ["static"] and snap["schema"] == 1


def test_the_event_stream_sends_the_current_snapshot_then_each_new_one(running):
    url, state, loop = running
    with urllib.request.urlopen(url + "api/events", timeout=10) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        first = json.loads(r.readline().removeprefix(b"data: "))
        assert r.readline() == b"\n"
        loop.run(state["collector"].refresh())
        second = json.loads(r.readline().removeprefix(b"data: "))
    assert second["version"] == first["version"] + 1


@pytest.mark.parametrize("args, message", [
    (["dashboard"], "--initial-peers MADDR ... is required"),
    (["dashboard", "--initial-peers", "/ip4/127.0.0.1/tcp/1", "--port", "0"], "is not a peer multiaddr"),
    (["dashboard", "--initial-peers", "/ip4/1.2.3.4/tcp/1/p2p/x", "--port", "70000"], "--port must be 0..65535"),
    (["node", "--metrics-port", "70000"], "--metrics-port must be 0..65535"),
])
def test_bad_arguments_are_one_line_and_exit_2(args, message):
    done = run_cli(*args, timeout_s=60)
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
