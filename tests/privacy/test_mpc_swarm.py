"""Private inference through three `swarmlm mpc-party` processes on loopback: the same tokens as
local greedy decoding (GPT-2 and Llama layouts), bad input answered with an error while the
party keeps serving, and a party killed mid-generation ending it with a clear error in time."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from swarmlm.errors import RemoteError
from swarmlm.model.generate import generate
from swarmlm.model.hf import load_model
from swarmlm.model.tokenizer import Tokenizer
from swarmlm.p2p.peer import Peer
from swarmlm.p2p.process import PeerProcess, open_child
from swarmlm.privacy.mpc import wire
from swarmlm.privacy.mpc.remote import PrivateSession, find_parties, generate_private
from swarmlm.store.model_id import directory_model_id as directory_id
from tests.helpers.metrics import metrics_url, scrape
from tests.helpers.swarm import LoopThread, poll_until, run_cli, start_nodes, stop_all, swarmlm_command
from tests.helpers.swarm_servers import TEXT, VOCAB
from tests.model.hf_models import build_hf
from tests.privacy.decisive import decisive

pytestmark = pytest.mark.slow
PROMPT = "def parse(line):"
# where private tokens are compared with local ones, the first of these whose greedy decode is
# decisive (tests/privacy/decisive.py)
PROMPTS = (PROMPT, "return self.", "for i in range(n):", "import os", "class Node:", "while True:", "if x is None:",
           "print(value)", "def __init__(self", "yield from", "with open(path) as f:", "except KeyError:")


def _decisive_prompt(model_dir: Path) -> str:
    tok = Tokenizer.load(model_dir)
    model, _ = load_model(model_dir)
    ids = decisive(model, [tok.encode(p) for p in PROMPTS], 16)
    return next(p for p in PROMPTS if tok.encode(p) == ids)


def _checkpoint(directory: Path, variant: str) -> Path:
    build_hf(directory, variant)
    Tokenizer.train_bpe([TEXT], vocab_size=VOCAB - 8).save(directory)
    return directory


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("mpc")
    models = {v: _checkpoint(root / v, v) for v in ("llama3", "gpt2")}
    nodes = start_nodes(1, root / "nodes")
    boot = nodes[0].maddrs[0]
    parties: dict[str, list[PeerProcess]] = {}
    try:
        for v, d in models.items():
            parties[v] = []
            for i in range(3):
                data = root / f"{v}-party{i}"
                cmd = swarmlm_command(["mpc-party", d, "--initial-peers", boot, "--data-dir", data,
                                       "--peer-timeout", "5", "--max-tokens", "128",
                                       *(["--metrics-port", "0"] if i == 0 else [])])
                parties[v].append(PeerProcess(open_child(cmd, log_path=data / "party.log"), data / "party.log"))
        for group in parties.values():
            for p in group:
                p.wait_ready(120)
        yield {"boot": boot, "models": models, "parties": parties}
    finally:
        stop_all([p for group in parties.values() for p in group])
        stop_all(nodes)


def _generate(swarm, variant: str, *extra: str, private: bool = True, prompt: str = PROMPT) -> dict:
    args = ["generate", str(swarm["models"][variant]), "--prompt", prompt, "--max-new-tokens", "16",
            "--temperature", "0", "--json", *extra]
    if private:
        args += ["--private", "--initial-peers", swarm["boot"]]
    out = run_cli(*args, timeout_s=240)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.decode().strip().splitlines()[-1])


@pytest.mark.parametrize("variant", ["llama3", "gpt2"])
def test_private_generation_equals_local_greedy(swarm, variant):
    private = _generate(swarm, variant, prompt=_decisive_prompt(swarm["models"][variant]))
    model, _ = load_model(swarm["models"][variant])
    assert len(private["output_ids"]) == 16
    assert private["output_ids"] == generate(model, private["prompt_ids"], max_new_tokens=16)
    mpc = private["mpc"]
    assert sorted(mpc["parties"]) == sorted(p.peer_id for p in swarm["parties"][variant])
    assert mpc["rounds"] > 16 and mpc["bytes"] > 0


def test_a_partys_metrics_count_its_sessions_steps_rounds_and_bytes(swarm):
    url = metrics_url(swarm["parties"]["llama3"][0])
    before = scrape(url)
    private = _generate(swarm, "llama3")
    after = scrape(url)
    moved = {k: after[k] - before.get(k, 0.0) for k in after if k.startswith("swarmlm_mpc_")}
    assert moved["swarmlm_mpc_sessions_total"] == 1 and moved["swarmlm_mpc_session_failures_total"] == 0
    assert moved["swarmlm_mpc_steps_total"] >= 16 and moved["swarmlm_mpc_step_seconds_count"] >= 16
    assert moved["swarmlm_mpc_tokens_total"] == len(private["prompt_ids"]) + 15
    assert moved["swarmlm_mpc_rounds_total"] > 16
    assert moved["swarmlm_mpc_sent_bytes_total"] > 0 and moved["swarmlm_mpc_received_bytes_total"] > 0
    assert after["swarmlm_mpc_sessions_open"] == 0
    assert after["swarmlm_heap_frozen_objects"] > 10_000      # settled once ready (heap.py)


def test_bad_input_gets_an_error_and_the_party_keeps_serving(swarm):
    model_dir = swarm["models"]["llama3"]
    model_id = directory_id(model_dir.resolve())
    loop = LoopThread()
    try:
        peer = loop.run(Peer.create(initial_peers=[swarm["boot"]], client_mode=True))
        parties = loop.run(find_parties(peer, model_id, timeout_s=30))
        side = loop.run(peer.side_channel())

        async def first_reply(record: bytes) -> tuple[int, object]:
            conn = await side.open(parties[0], wire.PURPOSE, timeout_s=10, max_record_bytes=wire.MAX_RECORD_BYTES)
            try:
                conn.write(record)
                return wire.unpack(await conn.read_record(), wire.ERROR, wire.READY)
            finally:
                conn.close()

        hello = wire.ClientHello(b"s" * 16, 0, parties, model_id, 8)
        for bad in (b"\x09garbage", wire.pack(wire.HELLO, wire.ClientHello(b"s" * 16, 0, parties, "dir-other", 8)),
                    wire.pack(wire.HELLO, wire.ClientHello(b"s" * 16, 0, parties, model_id, 10_000)),
                    wire.pack(wire.HELLO, wire.ClientHello(b"s" * 16, 1, parties, model_id, 8))):
            kind, msg = loop.run(first_reply(bad))
            assert kind == wire.ERROR and msg.message
        assert loop.run(first_reply(wire.pack(wire.HELLO, hello)))[0] in (wire.ERROR, wire.READY)  # others unlinked

        async def session_with(mutate) -> None:
            s = await PrivateSession.open(peer, parties, model_id, vocab_size=VOCAB, max_tokens=4, step_timeout_s=20)
            try:
                mutate(s)
                await s.step(torch.tensor([[1, 2, 3]]))
            finally:
                s.close()

        def wrong_step(s):
            s.step_no = 5

        def wrong_vocab(s):
            s.V = VOCAB + 1                          # shares of the wrong size

        for mutate in (wrong_step, wrong_vocab):
            with pytest.raises(RemoteError):
                loop.run(session_with(mutate))

        async def too_many_tokens() -> None:
            s = await PrivateSession.open(peer, parties, model_id, vocab_size=VOCAB, max_tokens=4, step_timeout_s=20)
            try:
                await s.step(torch.tensor([[1, 2, 3, 4, 5]]))
            finally:
                s.close()

        with pytest.raises(RemoteError, match="tokens"):
            loop.run(too_many_tokens())
        tokens, stats, _ = loop.run(generate_private(peer, model_id, [1, 2, 3], vocab_size=VOCAB, max_new_tokens=3,
                                                     parties=parties))
        model, _ = load_model(model_dir)
        assert tokens == generate(model, [1, 2, 3], max_new_tokens=3)
        loop.run(peer.shutdown())
    finally:
        loop.close()


def test_killed_party_ends_generation_with_a_clear_error_within_10s(swarm, tmp_path):
    victim = swarm["parties"]["llama3"][1]
    log = tmp_path / "client.log"
    cmd = swarmlm_command(["generate", swarm["models"]["llama3"], "--private", "--initial-peers", swarm["boot"],
                           "--prompt", PROMPT, "--max-new-tokens", "100", "--temperature", "0", "--json"])
    steps_before = victim.log_text().count(" step 3:")        # earlier tests' sessions are in the log too
    client = open_child(cmd, log_path=log)
    try:
        assert poll_until(lambda: victim.log_text().count(" step 3:") > steps_before, 120), victim.log_tail()
        victim.kill()
        killed_at = time.monotonic()
        code = client.wait(30)
        took = time.monotonic() - killed_at
    finally:
        if client.poll() is None:
            client.kill()
    err = log.read_text()
    assert code == 2 and took < 10, (code, took, err[-1000:])
    assert "MPC party" in err and "Traceback" not in err


def test_demo_hook_generates_privately_through_three_new_parties(swarm, tmp_path):
    from contextlib import ExitStack

    from swarmlm.demo.private import private_generation

    model_dir = swarm["models"]["gpt2"]
    with ExitStack() as children:
        def child(p):
            children.callback(p.stop)
            return p

        run = private_generation(str(model_dir), [swarm["boot"]], model_dir, [3, 1, 4, 1, 5], tmp_path, child,
                                 n_tokens=3)
    assert run.equal and len(run.tokens) == 3
    assert run.rounds > 0 and run.bytes > 0 and "equal to local greedy" in run.line()
