"""Servers enforce the ledger, end to end over loopback processes, on the embedded chain and on anvil.

A dev chain (`swarmlm ledger chain`, or anvil from scripts/setup), a ledger with a free quota of 50
tokens per epoch, one `swarmlm serve --ledger` process serving every block, and a client
(`swarmlm generate --swarm --ledger`, its account in its own $SWARMLM_HOME): 40 tokens are served,
the next 40 are refused in one line naming the quota (through `swarmlm api --ledger`: HTTP 429 with
that line; 5 more are served), the server settles and holds the tokens it served as
credit (`ledger status --json`); members of a co-signed training round get quota the next epoch.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from swarmlm.errors import UserError
from swarmlm.ledger import chain as chainlib
from swarmlm.ledger import keys, receipts
from tests.helpers.swarm import poll_until
from tests.helpers.swarm_servers import ServerProcesses, build_checkpoint

ROOT = Path(__file__).resolve().parents[2]
ANVIL = ROOT / ".tools" / "node_modules" / ".bin" / "anvil"
EPOCH_S = 3600


def _start_chain(kind: str, tmp_path: Path) -> tuple[subprocess.Popen, str]:
    log = open(tmp_path / f"{kind}.log", "w+")
    if kind == "anvil":
        if not ANVIL.exists():
            pytest.fail(f"anvil is missing at {ANVIL}: run ./scripts/setup (it installs @foundry-rs/anvil with npm)")
        proc = subprocess.Popen([str(ANVIL), "--host", "127.0.0.1", "--port", "0"], stdout=log,
                                stderr=subprocess.STDOUT)
        pattern = re.compile(r"Listening on (127\.0\.0\.1:\d+)")
    else:
        proc = subprocess.Popen([sys.executable, "-m", "swarmlm", "ledger", "chain", "--port", "0"], stdout=log,
                                stderr=subprocess.STDOUT)
        pattern = re.compile(r"^http://(127\.0\.0\.1:\d+)$", re.M)

    def url() -> str | None:
        log.seek(0)
        m = pattern.search(log.read())
        if m is None and proc.poll() is not None:
            raise RuntimeError(f"{kind} exited: {log.read()}")
        return f"http://{m.group(1)}" if m else None

    try:
        return proc, poll_until(url, 60.0)
    except BaseException:
        proc.kill()
        raise


def _cli(*args: str, home: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "SWARMLM_HOME": str(home)}
    out = subprocess.run([sys.executable, "-m", "swarmlm", *args], capture_output=True, text=True, env=env,
                         timeout=300)
    if check and out.returncode != 0:
        raise AssertionError(f"swarmlm {' '.join(args)} failed: {out.stderr}")
    return out


def _post(url: str, body: dict) -> tuple[int, dict]:
    import urllib.error
    import urllib.request
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _run(verb: str, home: Path, **kwargs) -> None:
    """`swarmlm ledger VERB` in this process (the same function the CLI calls), as `home`'s account."""
    from argparse import Namespace

    from swarmlm.ledger import commands
    getattr(commands, f"{verb}_from_args")(Namespace(data_dir=str(home), **kwargs))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("ledger-ckpt") / "llama", "llama")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["embedded", "anvil"])
def test_a_server_serves_the_free_quota_refuses_beyond_it_and_earns_the_credit(kind, checkpoint, tmp_path):
    chain, url = _start_chain(kind, tmp_path)
    servers = ServerProcesses(tmp_path)
    server_dir, client_home, trainer_home = tmp_path / "server0", tmp_path / "client", tmp_path / "trainer"
    try:
        rpc = ["--chain-rpc", url]
        for home in (server_dir, client_home, trainer_home):
            _run("fund", home, chain_rpc=url)
        ledger = _cli("ledger", "deploy", *rpc, "--epoch-seconds", str(EPOCH_S), "--free-tokens", "50",
                      "--sample-credit", "3", home=server_dir).stdout.split()[-1]
        at = [*rpc, "--ledger", ledger]
        _cli("ledger", "register", *at, "--server", "--data-dir", str(server_dir), home=server_dir)
        _run("register", client_home, chain_rpc=url, ledger=ledger, server=False)
        _run("register", trainer_home, chain_rpc=url, ledger=ledger, server=False)
        _run("advance", client_home, chain_rpc=url, seconds=EPOCH_S)        # the server serves from epoch 1

        server = servers.start(checkpoint, blocks=(0, 4), extra_args=["--ledger", ledger, "--chain-rpc", url])
        generate = ["generate", str(checkpoint), "--swarm", "--initial-peers", server.maddrs[0], "--prompt",
                    "the quick brown fox", "--temperature", "0", "--max-new-tokens", "40", *at, "--json"]
        first = _cli(*generate, home=client_home)
        assert len(json.loads(first.stdout.splitlines()[-1])["output_ids"]) == 40

        second = _cli(*generate, home=client_home, check=False)
        assert second.returncode == 2
        error = second.stderr.strip().splitlines()
        assert len(error) == 1 and "quota exceeded: 10 tokens left" in error[0] and "renews in" in error[0]

        # the same account through `swarmlm api --swarm --ledger`: 40 more is a 429 naming the quota, 5 is served
        api = subprocess.Popen([sys.executable, "-m", "swarmlm", "api", str(checkpoint), "--swarm", "--initial-peers",
                                server.maddrs[0], *at, "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True, env={**os.environ, "SWARMLM_HOME": str(client_home)})
        try:
            api_url = api.stdout.readline().strip()
            assert api_url.startswith("http://127.0.0.1:"), api_url
            status, body = _post(api_url + "/completions", {"model": checkpoint.name,
                                                            "prompt": "the quick brown fox", "max_tokens": 40,
                                                            "temperature": 0})
            assert status == 429 and body["error"]["code"] == "access_refused", body
            assert "quota exceeded: 10 tokens left" in body["error"]["message"] and "\n" not in body["error"]["message"]
            status, body = _post(api_url + "/completions", {"model": checkpoint.name,
                                                            "prompt": "the quick brown fox", "max_tokens": 5,
                                                            "temperature": 0})
            assert status == 200 and body["usage"]["completion_tokens"] == 5, body
        finally:
            api.terminate()
            api.wait(30)

        _cli("ledger", "settle", *at, "--now", "--data-dir", str(server_dir), home=server_dir)
        status = json.loads(_cli("ledger", "status", *at, "--json", "--data-dir", str(server_dir),
                                 home=server_dir).stdout)
        assert status["credit"] == 40 + 5 and status["epoch"] == 1

        # a training round's record, co-signed by both members: both get quota in the next epoch
        members = sorted((receipts.address_of(keys.load_or_create_key(h)) for h in (client_home, trainer_home)),
                         key=lambda a: int(a, 16))
        record = tmp_path / "round.json"
        record.write_text(json.dumps({"run": "run1", "round": 1, "epoch": 1, "members": members, "samples": [7, 7]}))
        _run("round", client_home, chain_rpc=url, ledger=ledger, file=str(record), submit=False)
        with pytest.raises(UserError, match="not yet signed by"):
            _run("round", client_home, chain_rpc=url, ledger=ledger, file=str(record), submit=True)
        _cli("ledger", "round", str(record), "--submit", *at, home=trainer_home)
        _run("advance", client_home, chain_rpc=url, seconds=EPOCH_S)
        trainer = json.loads(_cli("ledger", "status", *at, "--json", home=trainer_home).stdout)
        assert trainer["epoch"] == 2 and trainer["quota"] == 50 + 7 * 3
    finally:
        servers.close()
        chain.kill()
        chain.wait(10)


@pytest.mark.slow
def test_under_contention_a_priority_slot_holder_is_served_first(checkpoint, tmp_path):
    from swarmlm.errors import AccessRefused
    from swarmlm.ledger.payer import Payer
    from swarmlm.swarm.client.model import RemoteModel
    from swarmlm.swarm.client.remote import ClientOptions
    from swarmlm.swarm.client.session import SessionOptions

    chain, url = _start_chain("embedded", tmp_path)
    servers = ServerProcesses(tmp_path)
    server_dir = tmp_path / "server0"
    homes = {name: tmp_path / name for name in ("plain", "holder")}
    models = []
    try:
        rpc = ["--chain-rpc", url]
        for home in (server_dir, *homes.values()):
            _run("fund", home, chain_rpc=url)
        ledger = _cli("ledger", "deploy", *rpc, "--epoch-seconds", str(EPOCH_S), "--free-tokens", "1000",
                      "--slots", "1", home=server_dir).stdout.split()[-1]
        at = [*rpc, "--ledger", ledger]
        _run("register", server_dir, chain_rpc=url, ledger=ledger, server=True)
        for home in homes.values():
            _run("register", home, chain_rpc=url, ledger=ledger, server=False)
        _cli("ledger", "bid", *at, "--amount", "1000", "--epoch", "1", home=homes["holder"])   # epoch 0: commit
        _run("advance", server_dir, chain_rpc=url, seconds=EPOCH_S // 2)
        _cli("ledger", "reveal", *at, "--epoch", "1", home=homes["holder"])
        _run("advance", server_dir, chain_rpc=url, seconds=EPOCH_S // 2)
        _run("settle", server_dir, chain_rpc=url, ledger=ledger, auction=1, now=False)
        holder = json.loads(_cli("ledger", "status", *at, "--json", home=homes["holder"]).stdout)
        assert holder["epoch"] == 1 and holder["slot_holder"]
        w3 = chainlib.connect(url)
        mine = chainlib.LedgerClient(w3, ledger, keys.load_or_create_key(homes["holder"]))
        assert mine.call("escrow_of", 1, mine.account) == 1000
        _run("withdraw", homes["holder"], chain_rpc=url, ledger=ledger, unlock=0)    # the only bid: price 0
        assert mine.call("escrow_of", 1, mine.account) == 0 and mine.call("balance_of", mine.account) == 0

        server = servers.start(checkpoint, blocks=(0, 4),
                               extra_args=["--ledger", ledger, "--chain-rpc", url, "--max-sessions", "4"])

        def connect(name: str) -> RemoteModel:
            payer = Payer(chainlib.LedgerClient(w3, ledger, keys.load_or_create_key(homes[name])), homes[name],
                          new_tokens=4)
            options = ClientOptions(connect_timeout_s=60.0, session=SessionOptions(
                ticket=payer.ticket, ticket_accepted=payer.accepted, open_timeout_s=20.0))
            model = RemoteModel.connect(str(checkpoint), initial_peers=server.maddrs, options=options)
            models.append(model)
            return model

        plain = connect("plain")
        held = [plain.inference_session(batch=1, max_length=8) for _ in range(3)]     # load 3/4: contention
        with pytest.raises(AccessRefused, match="priority slot holders only"):
            plain.inference_session(batch=1, max_length=8)
        session = connect("holder").inference_session(batch=1, max_length=8)
        assert session.max_length == 8
        session.close()
        for s in held:
            s.close()
    finally:
        for m in models:
            m.close()
        servers.close()
        chain.kill()
        chain.wait(10)


@pytest.mark.slow
def test_two_servers_and_a_failover_never_serve_past_the_quota(checkpoint, tmp_path):
    from swarmlm.errors import AccessRefused
    from swarmlm.ledger.payer import Payer
    from swarmlm.ledger.policy import Gate
    from swarmlm.swarm.client.model import RemoteModel
    from swarmlm.swarm.client.remote import ClientOptions
    from swarmlm.swarm.client.session import SessionOptions

    chain, url = _start_chain("embedded", tmp_path)
    servers = ServerProcesses(tmp_path)
    dirs, home = [tmp_path / "server0", tmp_path / "server1"], tmp_path / "client"
    try:
        for d in (*dirs, home):
            _run("fund", d, chain_rpc=url)
        w3 = chainlib.connect(url)
        ledger = chainlib.deploy(w3, keys.load_or_create_key(home), chainlib.LedgerParams(epoch_seconds=EPOCH_S,
                                                                                          free_tokens=50))
        for d in dirs:
            _run("register", d, chain_rpc=url, ledger=ledger, server=True)
        _run("register", home, chain_rpc=url, ledger=ledger, server=False)
        _run("advance", home, chain_rpc=url, seconds=EPOCH_S)      # 2 servers: each grants 25 of the 50
        extra = ["--ledger", ledger, "--chain-rpc", url]
        first = servers.start(checkpoint, blocks=(0, 4), extra_args=extra)
        servers.start(checkpoint, blocks=(0, 4), initial_peers=first.maddrs, extra_args=extra)
        by_peer = {p.peer_id: p for p in servers.procs}
        payer = Payer(chainlib.LedgerClient(w3, ledger, keys.load_or_create_key(home)), home, new_tokens=20)
        options = ClientOptions(connect_timeout_s=60.0, session=SessionOptions(
            ticket=payer.ticket, ticket_accepted=payer.accepted, open_timeout_s=20.0, replacement_wait_s=20.0))
        with RemoteModel.connect(str(checkpoint), initial_peers=first.maddrs, options=options) as remote:
            tokens = []
            for step in remote.stream_generate([[1, 2, 3]], max_new_tokens=20):
                tokens.append(step[0])
                if len(tokens) == 5:
                    by_peer[remote.last_session.chain[0].peer_id].kill()      # failover to the other server
            assert len(tokens) == 20 and remote.last_session.recoveries == 1
            with pytest.raises(AccessRefused, match="quota exceeded: 5 tokens left"):
                for _ in remote.stream_generate([[1, 2, 3]], max_new_tokens=20):
                    pass
        credit = 0
        for d in dirs:                        # the killed server's receipts are on its disk: it settles them too
            c = chainlib.LedgerClient(w3, ledger, keys.load_or_create_key(d))
            Gate(c, d).settle(current_too=True)
            credit += c.call("credit_of", c.account, 1)
        assert credit == 40 <= 50
    finally:
        servers.close()
        chain.kill()
        chain.wait(10)
