"""What the ledger's enforcement costs generation: tokens/s through a `serve --ledger` server vs a plain one.

Starts the embedded dev chain, deploys a ledger with a free quota large enough for the whole run,
and two `swarmlm serve` processes on 127.0.0.1 each holding every block of the same random
`--preset` model, in two separate swarms: one plain, one with `--ledger`. A client in this process
(its receipts signed by a `Payer`) decodes greedily through each, alternating, `--repeats` rounds;
the ratio is the median of per-round ratios (ledger / plain; target >= 0.98). The ledger is only
consulted when a session opens; decoding steps never touch it.

Prints one JSON line per result: {"name", "value", "unit"}.

    python bench/ledger_generate.py [--preset tiny] [--new-tokens 64] [--repeats 7] [--control]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
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
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--control", action="store_true",
                        help="run the second server without --ledger too: the noise floor of the ratio")
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
            plain = start_server_process(str(ckpt), blocks=(0, cfg.n_layers), data_dir=root / "plain-server", env=env)
            servers.append(plain)
            metered = start_server_process(str(ckpt), blocks=(0, cfg.n_layers), data_dir=root / "ledger-server",
                                           env=env, extra_args=[] if args.control else ["--ledger", ledger, "--chain-rpc", url])
            servers.append(metered)
            payer = Payer(chainlib.LedgerClient(w3, ledger, keys.load_or_create_key(root / "client")), root / "client",
                          new_tokens=args.new_tokens)
            with_ledger = ClientOptions(session=SessionOptions(ticket=payer.ticket, ticket_accepted=payer.accepted)) \
                if not args.control else None
            models = [RemoteModel.connect(str(ckpt), initial_peers=plain.maddrs),
                      RemoteModel.connect(str(ckpt), initial_peers=metered.maddrs, options=with_ledger)]
            for m in models:                                   # warm up
                timed_stream(m.stream_generate([prompt], max_new_tokens=8))
            rates: dict[str, list[float]] = {"plain": [], "ledger": []}
            for i in range(args.repeats):
                pairs = list(zip(("plain", "ledger"), models))
                for name, m in (pairs if i % 2 == 0 else pairs[::-1]):     # alternate which goes first
                    rates[name].append(timed_stream(m.stream_generate([prompt], max_new_tokens=args.new_tokens))[1])
            for name, r in rates.items():
                emit(f"tokens_per_s_{name}", statistics.median(r), "tokens/s", preset=args.preset)
            emit("tokens_per_s_ledger_over_plain",
                 statistics.median(b / a for a, b in zip(rates["plain"], rates["ledger"])), "ratio", target=0.98)
        finally:
            for m in models:
                m.close()
            for s in servers:
                s.stop(timeout_s=20.0)
            chain.kill()
            chain.wait(10)


if __name__ == "__main__":
    main()
