"""What the ledger's enforcement costs generation: tokens/s through a `serve --ledger` server vs plain ones.

Starts the embedded dev chain, deploys a ledger with a free quota large enough for the whole run,
and three `swarmlm serve` processes on 127.0.0.1, each holding every block of the same random
`--preset` model, each in a swarm of its own: two plain (A and B) and one with `--ledger`. A client
in this process (its receipts signed by a `Payer`) runs many short trials: in each round one
generation through each server, in a rotating order; every trial opens a new session, so each
metered trial pays the whole price of enforcement (a ticket signed, the server's admission
decision over its cached chain state, the receipt kept on disk) — decoding steps never consult the
ledger. Two rates per trial: end to end (new tokens / time from the call to the last token, the
session's opening included) and decode (after the first token). Reported: the median of each,
and the median over rounds of the per-round ratios; plain B / plain A is the noise
floor measured in the same run (two identical servers differ by this much); the ledger's ratio is
against the mean of the two plain servers in the same round. Target: ledger / plain
>= 0.98. The machine may be loaded: compare the ratio with the floor, not the absolute rates.

Prints one JSON line per result: {"name", "value", "unit"}.

    python bench/ledger_generate.py [--preset tiny] [--new-tokens 16] [--trials 40]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path

import torch

from ideal_pipeline import timed_stream
from ledger_gas import start
from swarmlm.ledger import chain as chainlib
from swarmlm.ledger import commands, keys
from swarmlm.ledger.payer import Payer
from swarmlm.model.config import PRESETS
from swarmlm.model.hf import save_model
from swarmlm.model.transformer import Transformer
from swarmlm.swarm.client.model import RemoteModel
from swarmlm.swarm.client.remote import ClientOptions
from swarmlm.swarm.client.session import SessionOptions
from swarmlm.swarm.server.serve import start_server_process


def emit(name: str, value: float, unit: str, **extra) -> None:
    print(json.dumps({"name": name, "value": round(value, 4), "unit": unit, **extra}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--trials", type=int, default=40, help="rounds (one trial per server in each)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = PRESETS[args.preset].replace(eos_token_id=None, bos_token_id=None)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt = root / "model"
        torch.manual_seed(0)
        save_model(Transformer(cfg), cfg, ckpt)
        prompt = torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
        chain, url = start([sys.executable, "-m", "swarmlm", "ledger", "chain", "--port", "0"],
                           r"(127\.0\.0\.1:\d+)", root / "chain.log")
        servers, models = [], []
        try:
            ns = lambda home, **kw: Namespace(data_dir=str(home), chain_rpc=url, **kw)   # noqa: E731
            for home in ("ledger-server", "client"):
                commands.fund_from_args(ns(root / home))
            w3 = chainlib.connect(url)
            ledger = chainlib.deploy(w3, keys.load_or_create_key(root / "ledger-server"),
                                     chainlib.LedgerParams(epoch_seconds=36000, free_tokens=10 ** 9))
            commands.register_from_args(ns(root / "ledger-server", ledger=ledger, server=True))
            commands.register_from_args(ns(root / "client", ledger=ledger, server=False))
            commands.advance_from_args(ns(root, seconds=36000))
            env = {"OMP_NUM_THREADS": "1"}
            names = ("plain_a", "plain_b", "ledger")
            for name in names:
                extra = ["--ledger", ledger, "--chain-rpc", url] if name == "ledger" else []
                servers.append(start_server_process(str(ckpt), blocks=(0, cfg.n_layers), data_dir=root / f"{name}-server",
                                                    env=env, extra_args=extra))
            payer = Payer(chainlib.LedgerClient(w3, ledger, keys.load_or_create_key(root / "client")), root / "client",
                          new_tokens=args.new_tokens)
            metered = ClientOptions(session=SessionOptions(ticket=payer.ticket, ticket_accepted=payer.accepted))
            models = [RemoteModel.connect(str(ckpt), initial_peers=s.maddrs, options=metered if n == "ledger" else None)
                      for n, s in zip(names, servers)]
            for m in models:                                   # warm up
                for _ in range(2):
                    timed_stream(m.stream_generate([prompt], max_new_tokens=8))
            e2e: dict[str, list[float]] = {n: [] for n in names}
            decode: dict[str, list[float]] = {n: [] for n in names}
            order = list(zip(names, models))
            for i in range(args.trials):
                for name, m in order[i % 3:] + order[:i % 3]:          # rotate which goes first
                    t0 = time.perf_counter()
                    _, rate, tokens = timed_stream(m.stream_generate([prompt], max_new_tokens=args.new_tokens))
                    e2e[name].append(len(tokens) / (time.perf_counter() - t0))
                    decode[name].append(rate)
            for kind, rates in (("e2e", e2e), ("decode", decode)):
                for name in names:
                    emit(f"tokens_per_s_{kind}_{name}", statistics.median(rates[name]), "tokens/s",
                         preset=args.preset, trials=args.trials, new_tokens=args.new_tokens)
                rounds = list(zip(rates["plain_a"], rates["plain_b"], rates["ledger"]))
                emit(f"tokens_per_s_{kind}_ledger_over_plain", statistics.median(2 * c / (a + b) for a, b, c in rounds),
                     "ratio (per round: ledger / mean of the two plain)", target=0.98)
                emit(f"tokens_per_s_{kind}_plain_b_over_plain_a", statistics.median(b / a for a, b, _ in rounds),
                     "ratio (noise floor: two identical plain servers)")
        finally:
            for m in models:
                m.close()
            for s in servers:
                s.stop(timeout_s=20.0)
            chain.kill()
            chain.wait(10)


if __name__ == "__main__":
    main()
