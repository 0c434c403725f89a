"""The dashboard beside a real loopback swarm, seen through a real headless Chromium.

One swarm for the module: a `swarmlm node`, three `swarmlm serve` processes of a tiny 4-block
model (blocks 0:2, 1:3 and 2:4, each with `--metrics-port 0`), a `swarmlm train --swarm` peer,
and `swarmlm dashboard` as a process (started as `demo --dashboard` starts it), as a user runs them. In order: /api/swarm agrees with the
DHT; the page lists the three servers with their spans; a generation moves the metrics; the loss
plot gains points; the server of 0:2 is killed and the page shows it offline or gone and block 0
as a hole, within 30 s (a screenshot is saved in the test's tmp dir).
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import pytest

import swarmlm
from swarmlm.demo.dashboard import start_dashboard
from swarmlm.p2p.process import PeerProcess
from swarmlm.swarm.server.serve import start_server_process
from tests.helpers.browser import headless_chromium
from tests.helpers.collab import TrainPeer
from tests.helpers.swarm import STARTUP_TIMEOUT_S, LoopThread, NodeProcess, poll_until, run_cli, stop_all
from tests.helpers.swarm_servers import TEXT, build_checkpoint

pytestmark = pytest.mark.slow

SPANS = [(0, 2), (1, 3), (2, 4)]
TTL_S = "9"                 # the servers' announcement lifetime: a killed one is silent after ~6.5 s
PAGE_TIMEOUT_S = 30.0       # the bound for the page to show a killed server


class Swarm:
    def __init__(self, root: Path):
        self.root = root
        self.ckpt = build_checkpoint(root / "ckpt", "llama")
        self.procs: list[PeerProcess] = []
        (root / "pinned.txt").write_text(TEXT)
        added = run_cli("store", "add", str(root / "pinned.txt"), "--data-dir", str(root / "node"))
        assert added.returncode == 0, added.stderr
        self.root_cid = added.stdout.decode().split()[-1]
        self.node = NodeProcess(root / "node")
        self.procs.append(self.node)
        self.maddr = self.node.wait_ready()[0]
        self.servers = {}
        for start, end in SPANS:
            p = start_server_process(self.ckpt, blocks=(start, end), initial_peers=[self.maddr],
                                     data_dir=root / f"serve{start}{end}", wait=False,
                                     extra_args=["--announce-ttl", TTL_S, "--metrics-port", "0"],
                                     env={"OMP_NUM_THREADS": "1"})
            self.procs.append(p)
            self.servers[(start, end)] = p
        for p in self.servers.values():
            p.wait_ready(STARTUP_TIMEOUT_S)
        self.dashboard, self.url = start_dashboard([self.maddr], log_path=root / "dashboard.log", interval_s=0.5,
                                                   timeout_s=STARTUP_TIMEOUT_S)      # as `demo --dashboard` does
        self.procs.append(self.dashboard)

    def start_trainer(self, steps: int) -> TrainPeer:
        """A `train --swarm` peer of run "dash": a lone peer steps fast, so it is started when needed."""
        (self.root / "corpus.txt").write_text(TEXT * 20)
        trainer = TrainPeer(self.root / "train", ["--run-id", "dash", "--steps", str(steps), "--batch-size", "2",
                                                  "--seq-len", "32", "--data", str(self.root / "corpus.txt"),
                                                  "--initial-peers", self.maddr])
        self.procs.append(trainer)
        return trainer

    def metrics_url(self, span: tuple[int, int]) -> str:
        proc = self.servers[span]
        found = poll_until(lambda: re.search(r"metrics: (http://\S+/metrics)", proc.log_text()), 30)
        assert found, f"no metrics URL in the log of the server of {span}:\n{proc.log_tail()}"
        return found.group(1)

    def api(self) -> dict:
        with urllib.request.urlopen(self.url + "api/swarm", timeout=10) as r:
            return json.loads(r.read())

    def close(self) -> None:
        for p in self.procs:
            if p is self.node:
                continue
            p.kill()
        stop_all([self.node])


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    s = Swarm(tmp_path_factory.mktemp("dash"))
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def browser(swarm):
    driver = headless_chromium()
    try:
        driver.set_page_load_timeout(30)
        driver.get(swarm.url)
        yield driver
    finally:
        driver.quit()


# The page re-renders on every update, so it is read in one script each time (no stale elements).
ROWS_JS = ("return Object.fromEntries([...document.querySelectorAll('tr.server')].map("
           "r => [r.dataset.peerId, [r.dataset.blocks, r.dataset.state]]))")
HOLES_JS = "const h = document.querySelector('[data-holes]'); return h === null ? null : h.dataset.holes"
POINTS_JS = ("const p = document.querySelector(\"svg.loss-plot[data-run-id='dash']\"); "
             "return p === null ? -1 : Number(p.dataset.points)")
MODELS_TEXT_JS = "const m = document.getElementById('panel-models'); return m === null ? '' : m.innerText"


def online_spans(snapshot: dict) -> dict[str, tuple[int, int]]:
    return {s["peer_id"]: tuple(s["blocks"]) for s in snapshot.get("servers", []) if s["state"] == "online"}


def test_api_swarm_agrees_with_the_dht(swarm):
    from swarmlm.p2p.peer import Peer
    from swarmlm.swarm.dht import read_servers

    expected = {p.peer_id: span for span, p in swarm.servers.items()}

    def listed() -> dict | None:
        snap = swarm.api()
        return snap if online_spans(snap) == expected else None

    snap = poll_until(listed, 60, every_s=0.3)
    assert snap, f"/api/swarm never listed the three servers: {swarm.api()}"
    [model] = snap["models"]
    assert model["n_layers"] == 4 and model["holes"] == [] and model["coverage"] == [1, 2, 2, 1]

    async def read() -> dict:
        async with await Peer.create(initial_peers=[swarm.maddr], client_mode=True) as peer:
            return await read_servers(peer, model["model"], 4)

    loop = LoopThread()
    try:
        records = loop.run(read())
    finally:
        loop.close()
    assert {pid: (r.start, r.end) for pid, r in records.items()} == expected
    for row in snap["servers"]:
        record = records[row["peer_id"]]
        assert row["throughput"] == record.block_tokens_per_s and row["state"] == record.state == "online"
        assert row["dtype"] == record.dtype and row["model"] == record.model
    [root] = snap["store"]["roots"]
    assert (root["cid"], root["holders"], root["replicas"]) == (swarm.root_cid, [swarm.node.peer_id], 1)
    assert root["size_bytes"] == len(TEXT.encode())


def test_page_lists_the_three_servers_with_their_blocks(swarm, browser):
    expected = {p.peer_id: [f"{a}:{b}", "online"] for (a, b), p in swarm.servers.items()}
    assert poll_until(lambda: browser.execute_script(ROWS_JS) == expected, 30, every_s=0.3), \
        browser.execute_script(ROWS_JS)
    text = browser.execute_script(MODELS_TEXT_JS)
    for (a, b) in SPANS:
        assert f"{a}:{b}" in text
    assert "every block is covered" in text and browser.execute_script(HOLES_JS) == ""
    # each server's quantization and version, as announced; the federated and MPC panels are there, empty
    cells = browser.execute_script("return [...document.querySelectorAll('tr.server')].map(r => "
                                   "[r.querySelector('td.quant').textContent, r.querySelector('td.version').textContent])")
    assert cells == [["none", swarmlm.__version__]] * 3
    for panel, empty in (("fl_runs", "no federated run"), ("mpc", "no MPC party")):
        assert empty in browser.execute_script(f"return document.getElementById('panel-{panel}').textContent")
    assert browser.execute_script("return document.querySelectorAll('script[src^=\"http\"], link[href^=\"http\"]')"
                                  ".length") == 0          # nothing from elsewhere


def test_metrics_parse_and_count_the_tokens_generated(swarm):
    from prometheus_client.parser import text_string_to_metric_families

    url = swarm.metrics_url((0, 2))

    def scrape() -> dict[str, float]:
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
        values = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if not sample.labels:
                    values[sample.name] = sample.value
        return values

    before = scrape()
    for name in ("swarmlm_server_tokens_total", "swarmlm_server_steps_total", "swarmlm_server_sessions_opened_total"):
        assert name in before, sorted(before)
    assert before["swarmlm_heap_frozen_objects"] > 10_000      # settled once ready (heap.py)
    done = run_cli("generate", str(swarm.ckpt), "--swarm", "--initial-peers", swarm.maddr, "--prompt", "the quick",
                   "--max-new-tokens", "6", "--temperature", "0", "--json", timeout_s=180)
    assert done.returncode == 0, done.stderr
    after = scrape()
    assert after["swarmlm_server_tokens_total"] >= before["swarmlm_server_tokens_total"] + 6
    assert after["swarmlm_server_steps_total"] >= before["swarmlm_server_steps_total"] + 6
    assert after["swarmlm_server_sessions_opened_total"] >= before["swarmlm_server_sessions_opened_total"] + 1


def test_the_loss_plot_gains_points(swarm, browser):
    trainer = swarm.start_trainer(steps=2000)

    def points() -> int:
        return browser.execute_script(POINTS_JS)

    try:
        first = poll_until(lambda: (n := points()) >= 2 and n, 120, every_s=0.2)
        assert first, f"no loss plot with points; trainer log:\n{trainer.log_tail()}"
        assert poll_until(lambda: points() > first, 30, every_s=0.2), f"the plot stayed at {first} points"
        assert browser.execute_script("return document.querySelectorAll('svg.loss-plot polyline').length") == 1
    finally:
        trainer.kill()                 # the rest of the module needs no training


def test_a_killed_server_shows_offline_and_its_hole_within_30_s(swarm, browser, tmp_path):
    victim = swarm.servers[(0, 2)]
    victim_id = victim.peer_id
    victim.kill()
    killed_at = time.monotonic()

    def shown() -> bool:
        state = browser.execute_script(ROWS_JS).get(victim_id, [None, "gone"])[1]
        return state in ("offline", "gone") and browser.execute_script(HOLES_JS) == "0:1"

    assert poll_until(shown, PAGE_TIMEOUT_S, every_s=0.3), browser.execute_script(MODELS_TEXT_JS)
    took = time.monotonic() - killed_at
    shot = tmp_path / "dashboard.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 1000
    print(f"\nthe page showed the killed server offline and block 0 as a hole {took:.1f} s after the kill; "
          f"screenshot: {shot}")
    snap = swarm.api()
    assert snap["models"][0]["holes"] == [[0, 1]]
    assert online_spans(snap) == {p.peer_id: span for span, p in swarm.servers.items() if span != (0, 2)}
