"""The swarm demo: the main job of DESIGN.md, on loopback, in a few minutes on 2 cores.

1. prepare the embedded corpus once (tokenizer + token cache, shared by every peer);
2. a bootstrap node starts the swarm; N training peers train the tiny model together
   (`swarmlm train --swarm`), ending with identical weights;
3. the trained model is published into a content store (one manifest CID) and a storage
   node serves it;
4. a ledger is deployed on an embedded dev chain (ledger.py); three servers registered on it
   fetch only their blocks by that CID, verified, and announce their spans (blocks 0:2, and 2:4
   twice, so the second half has a replacement), admitting sessions by the ledger's quotas;
5. a client generates through the servers, paying with signed receipts; the server it uses for
   the second half is killed (SIGKILL) mid-generation, the client fails over and finishes, and
   the tokens are checked against local greedy decoding of the same weights; a second request
   past the client's free quota is refused, and the servers settle the credit they earned;
6. one federated round (federated.py): clients with private shards of the corpus train the
   model locally, the coordinator learns only the sum of their updates (secure aggregation),
   with client-level differential privacy (ε from the accountant);
7. three MPC parties generate a few tokens privately (private.py): none sees the prompt;
8. a summary (summary.py: training and validation loss, the steps that were chained, whether the
   chain was re-linked around the replica, whether the tokens matched, the ledger's credit and
   refusal, ε, the private tokens), also written to summary.json; every child process is stopped.
   With `dashboard`, the dashboard (dashboard.py) watches the whole run.

Wires library calls and child processes together and prints; holds no logic of its own.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from swarmlm.demo.federated import federated_part, run_federated_round
from swarmlm.demo.ledger import DemoLedger
from swarmlm.demo.private import private_generation, start_parties
from swarmlm.demo.summary import SUMMARY_FILE, Generation, Training, report
from swarmlm.model.generate import generate
from swarmlm.model.hf import load_model
from swarmlm.model.tokenizer import Tokenizer
from swarmlm.demo.children import start_peer_process
from swarmlm.p2p.process import PeerProcess
from swarmlm.store.dag import open_store
from swarmlm.store.manifest import publish_model
from swarmlm.swarm.client.model import RemoteModel
from swarmlm.swarm.server.serve import start_server_process
from swarmlm.train.config import load_run_config
from swarmlm.train.loop import prepare_data

PROMPT = "    def __init__(self"
# The demo's training: the tiny preset with small per-peer batches and a short warmup, so a
# few minutes of 2 cores go into many optimizer steps rather than a few big ones.
DEMO_CONFIG = """[model]
preset = "tiny"
[train]
batch_size = 8
warmup_steps = 10
eval_every = 1000
"""
NEW_TOKENS = 40
KILL_AFTER = 12          # tokens generated before a server is killed
PRIVATE_TOKENS = 4       # generated through the MPC parties
STEPS = 7
STARTUP_S = 180.0


def run_demo(*, peers: int = 3, steps: int = 200, out: str | None = None, dashboard: bool = False) -> int:
    """Run the whole demo; returns the process exit code (0 when generation survived and matched,
    the ledger refused the request over its quota, the federated round reported ε and the private
    tokens matched). With `out`, the run is kept there, with summary.json: the training record, the
    swarm's and local greedy decoding's tokens, and each later part's record. With `dashboard`, the
    dashboard runs beside the swarm (its URL is printed)."""
    if peers < 1 or steps < 1:
        from swarmlm.errors import UserError
        raise UserError("--peers and --steps must be at least 1")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="swarmlm-demo-") as tmp, ExitStack() as children:
        root = Path(out) if out else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)

        def child(p: PeerProcess) -> PeerProcess:
            children.callback(p.stop)
            return p

        _say(1, "preparing the corpus (the Python standard library) and its tokenizer")
        config = root / "demo.toml"
        config.write_text(DEMO_CONFIG)
        prepare_data(load_run_config(str(config), steps=steps), None, progress=True)

        _say(2, f"starting a swarm on 127.0.0.1 and training the tiny model with {peers} peers for {steps} steps")
        boot = child(start_peer_process(["node", "--host", "127.0.0.1", "--data-dir", root / "boot"],
                                        log_path=root / "boot" / "node.log", timeout_s=STARTUP_S))
        initial = boot.maddrs[:1]
        print(f"      bootstrap peer {initial[0]}", flush=True)
        if dashboard:
            from swarmlm.demo.dashboard import start_dashboard
            dash, url = start_dashboard(initial, log_path=root / "dashboard.log")
            children.callback(dash.stop)
            print(f"      dashboard {url}", flush=True)
        trainers = [child(start_peer_process(
            ["train", "--swarm", "--run-id", "demo", "--initial-peers", *initial, "--config", config,
             "--steps", steps, "--min-peers", peers, "--out", root / f"trainer{i}", "--data-dir", root / f"trainer{i}",
             "--no-progress", "--host", "127.0.0.1"],
            log_path=root / f"trainer{i}" / "train.log", wait=False)) for i in range(peers)]
        _follow_training(trainers, root / "trainer0" / "metrics.jsonl", steps)
        summary_line = next((ln for ln in reversed(trainers[0].output) if ln.startswith("trained")), "")
        print(f"      {summary_line}", flush=True)
        records = [json.loads(ln) for ln in (root / "trainer0" / "metrics.jsonl").read_text().splitlines()]
        training = Training.from_metrics(records)

        _say(3, "publishing the trained model into the content store")
        cid = str(publish_model(open_store(root / "store"), root / "trainer0", name="swarmlm-demo-tiny"))
        storage = child(start_peer_process(["node", "--host", "127.0.0.1", "--data-dir", root / "store",
                                            "--initial-peers", *initial],
                                           log_path=root / "store" / "node.log", timeout_s=STARTUP_S))
        print(f"      manifest CID {cid}, served by {storage.peer_id[:16]}…", flush=True)

        _say(4, "deploying a ledger on an embedded chain; starting 3 servers under it that fetch only their "
                "blocks by CID: 0:2, 2:4 and a replica of 2:4")
        spans = [(0, 2), (2, 4), (2, 4)]
        ledger = DemoLedger.start(root / "ledger", n_servers=len(spans), new_tokens=NEW_TOKENS)
        children.callback(ledger.close)
        server_args = [ledger.server_args(root / f"server{i}") for i in range(len(spans))]
        ledger.open_epoch()                      # servers registered now serve from the next epoch
        print(f"      ledger {ledger.ledger} at {ledger.url}, free quota {len(spans) * NEW_TOKENS} tokens an epoch",
              flush=True)
        servers = [child(start_server_process(cid, blocks=span, initial_peers=initial, data_dir=root / f"server{i}",
                                              extra_args=server_args[i], wait=False)) for i, span in enumerate(spans)]
        parties = start_parties(cid, initial, root, child, wait=False)     # for step 7; they start meanwhile
        for server, span in zip(servers, spans):
            server.wait_ready(STARTUP_S)
            print(f"      server {server.peer_id[:16]}… holds blocks {span[0]}:{span[1]} "
                  f"(ready after {server.ready_after_s:.1f} s)", flush=True)

        _say(5, f"generating through the swarm; killing a server after {KILL_AFTER} tokens")
        tok = Tokenizer.load(root / "trainer0")
        prompt_ids = tok.encode(PROMPT)
        tokens, killed, recoveries, chain, gen_s = _generate_with_failure(cid, initial, prompt_ids, servers, tok,
                                                                          options=ledger.client_options())
        local_model, cfg = load_model(root / "trainer0")
        expected = generate(local_model, prompt_ids, max_new_tokens=NEW_TOKENS, temperature=0.0, eos_id=tok.eos_id)
        print("\n" + "-" * 60 + f"\n{PROMPT}{tok.decode(tokens)}\n" + "-" * 60, flush=True)

        refused = ledger.refused_request(cid, initial, prompt_ids)
        print(f"      the same client again, past its free quota: {refused or 'served (it should not be)'}", flush=True)
        settled = ledger.report([root / f"server{i}" for i in range(len(spans))], refused)

        _say(6, "one federated round: 3 clients with private shards, secure aggregation, differential privacy")
        federated = run_federated_round(root / "trainer0", root / "federated", initial_peers=initial, n_clients=3)

        _say(7, f"generating {PRIVATE_TOKENS} tokens privately through 3 MPC parties (none sees the prompt)")
        private = private_generation(cid, initial, root / "trainer0", prompt_ids, root, child,
                                     n_tokens=PRIVATE_TOKENS, parties=parties)
        print(f"      {private.line()}", flush=True)

        gen = Generation(prompt_ids=prompt_ids, swarm_tokens=tokens, local_tokens=expected, seconds=gen_s,
                         recoveries=recoveries, killed=killed, chained_steps=chain[0], relinked=chain[1])
        n_params = sum(p.numel() for p in local_model.parameters())
        code = report(swarm=f"1 bootstrap, {peers} trainers, 1 storage node, {len(servers)} servers (all on 127.0.0.1)",
                      model=f"{cfg.architecture}, {cfg.n_layers} blocks, manifest {cid}", n_params=n_params,
                      training=training, gen=gen, path=root / SUMMARY_FILE,
                      parts=[settled.part(), federated_part(federated), private.part()])
        if out:
            print(f"  details     {root / SUMMARY_FILE}")
        print(f"  total       {time.perf_counter() - t0:.0f} s")
    return code


def _say(n: int, text: str) -> None:
    print(f"[{n}/{STEPS}] {text} ...", flush=True)


def _follow_training(trainers: list[PeerProcess], metrics: Path, steps: int) -> None:
    """Print the first trainer's progress until every trainer exits."""
    last = 0
    deadline = time.monotonic() + 60 + steps * 5
    while any(t.proc.poll() is None for t in trainers):
        if time.monotonic() > deadline:
            raise RuntimeError(f"training did not finish in time; a trainer's log:\n{trainers[0].log_tail()}")
        time.sleep(1.0)
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if lines and len(lines) >= last + max(1, steps // 6):
            rec = json.loads(lines[-1])
            print(f"      step {rec['step']:>4}/{steps}  training loss {rec['loss']:.3f}  "
                  f"peers {rec.get('peers', '?')}", flush=True)
            last = len(lines)
    for t in trainers:
        if t.wait_exit(30) != 0:
            raise RuntimeError(f"a trainer failed; its log:\n{t.log_tail()}")


def _generate_with_failure(cid: str, initial: list[str], prompt_ids: list[int], servers: list[PeerProcess],
                           tok: Tokenizer, *, options=None) -> tuple[list[int], str, int, tuple[int, bool], float]:
    by_peer = {s.peer_id: s for s in servers}
    tokens: list[int] = []
    killed = ""
    # the failover is reported in the summary; its warning would only break the streamed text
    swarm_log = logging.getLogger("swarmlm.swarm")
    level = swarm_log.level
    swarm_log.setLevel(logging.ERROR)
    with RemoteModel.connect(cid, initial_peers=initial, connect_timeout_s=60, options=options) as remote:
        t0 = time.perf_counter()
        for step in remote.stream_generate([prompt_ids], max_new_tokens=NEW_TOKENS, eos_id=tok.eos_id):
            if step[0] is None:
                break
            tokens.append(step[0])
            print(tok.decode([step[0]]), end="", flush=True)
            if len(tokens) == KILL_AFTER:
                hop = next(h for h in remote.last_session.chain if h.start == 2)
                by_peer[hop.peer_id].kill()
                killed = hop.peer_id
                print(f" [killed server {killed[:12]}… (blocks 2:4)] ", end="", flush=True)
        gen_s = time.perf_counter() - t0
        session = remote.last_session
        recoveries, chain = session.recoveries, (session.chained_steps, session.chained)
    swarm_log.setLevel(level)
    print(flush=True)
    return tokens, killed, recoveries, chain, gen_s
