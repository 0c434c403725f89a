"""The `swarmlm` command: parses `swarmlm <verb> ...` and calls one library function per verb.

Each verb has an `_add_<verb>` (its arguments) and a `_run_<verb>` (the call). Library code
raises `UserError` for bad input and other `SwarmlmError`s for what went wrong in the swarm;
`main` prints any of them (and an OSError about a path) as one line naming the object, and
exits 2, never with a traceback.
Heavy imports happen inside `_run_*`, so `swarmlm --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys

from swarmlm.errors import SwarmlmError, UserError


# ---- demo ---------------------------------------------------------------------------------

def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="a local swarm: peers train a tiny model, serve it by CID, generate through a failure")
    p.add_argument("--peers", type=int, default=3, help="peer processes in the local swarm")
    p.add_argument("--steps", type=int, default=200, help="training steps of the swarm")
    p.add_argument("--out", default=None, help="where to keep the run (default: a temporary folder)")
    p.add_argument("--dashboard", action="store_true", help="also start the dashboard beside the swarm; prints its URL")
    p.set_defaults(run=_run_demo)


def _run_demo(args) -> int:
    from swarmlm.demo import run_demo
    return run_demo(peers=args.peers, steps=args.steps, out=args.out, dashboard=args.dashboard)


# ---- train --------------------------------------------------------------------------------

def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model (one process, torchrun, or the swarm)")
    p.add_argument("--config", default="tiny", help="preset name (tiny, small, t5-tiny) or a TOML config file")
    p.add_argument("--data", default=None, help="corpus: a text file or directory (default: the Python stdlib)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--out", default=None, help="run directory: checkpoint, metrics.jsonl (default: runs/<config>)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_swarm_train_flags(p)
    _add_parallel_train_flags(p)
    p.set_defaults(run=_run_train)


def _add_parallel_train_flags(p) -> None:
    g = p.add_argument_group("in-cluster parallel training under torchrun (swarmlm.parallel)")
    for name, what in (("dp", "data-parallel replicas (DDP)"), ("fsdp", "ranks sharding parameters (FSDP2)"),
                       ("tp", "tensor-parallel ranks"), ("pp", "pipeline ranks"), ("cp", "context-parallel ranks")):
        g.add_argument(f"--{name}", type=int, default=None, metavar="N", help=what)
    g.add_argument("--pp-schedule", default="1f1b", choices=["gpipe", "1f1b", "interleaved-1f1b"])
    g.add_argument("--microbatches", type=int, default=0, metavar="N",
                   help="micro-batches per pipeline step (default: the number of stages)")


def _add_swarm_train_flags(p) -> None:
    g = p.add_argument_group("collaborative training over the swarm (swarmlm.collab)")
    g.add_argument("--swarm", action="store_true", help="train together with other peers of --run-id")
    g.add_argument("--run-id", default=None, help="name of the collaborative run")
    g.add_argument("--initial-peers", nargs="*", default=[], metavar="MADDR", help="peers to join through")
    g.add_argument("--target-batch", type=int, default=None,
                   help="samples per global step over the swarm (default: one micro-batch per peer)")
    g.add_argument("--diloco", type=int, default=0, metavar="H", help="DiLoCo: average every H local steps")
    g.add_argument("--compression", default="none", choices=["none", "fp16", "int8"])
    g.add_argument("--aggregator", default="mean", choices=["mean", "trimmed-mean", "centered-clip"])
    g.add_argument("--collab-transport", default="auto", choices=["auto", "libp2p"],
                   help="averaging traffic: auto = the peers' encrypted side channel (AES-256-GCM over direct TCP) "
                        "between group members where reachable, else libp2p; libp2p = libp2p's encrypted streams only")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=0)
    g.add_argument("--data-dir", default=None, help="peer identity and block store (default: $SWARMLM_HOME)")
    g.add_argument("--round-timeout", type=float, default=30.0, metavar="S", help="bound on one averaging round")
    g.add_argument("--publish-every", type=int, default=0, metavar="N",
                   help="publish the model into the store every N global steps (0: never)")
    g.add_argument("--min-peers", type=int, default=0, help="wait (up to 2 min) for this many peers before training")
    _add_ledger_flags(g, "co-sign each averaging round's record with its members and submit it to this ledger "
                         "(credit for the samples; account in --data-dir)")


def _run_train(args) -> int:
    # three trainers, one verb: the choice is made here so that train/ knows nothing of the layers above it
    from swarmlm.train.t5_loop import is_t5_run, train_t5_from_args
    if is_t5_run(args.config):  # the encoder-decoder family: one process, its own objective and loop
        from swarmlm.parallel.launch import wants_parallel
        return train_t5_from_args(args, distributed=args.swarm or wants_parallel(args))
    if args.swarm:
        from swarmlm.collab.run import run_swarm_training
        if args.ledger:                   # the ledger's signing, as plain callables: collab never imports ledger
            from swarmlm.collab.witness import Cosigner
            from swarmlm.ledger.commands import round_book_from_args
            book = round_book_from_args(args)
            return run_swarm_training(args, cosigner=Cosigner(
                account=book.account, epoch=book.epoch, member_ok=book.member_ok, sign=book.sign,
                signed_by=book.signed_by, submit=book.submit, recorded=book.recorded))
        return run_swarm_training(args)
    if getattr(args, "ledger", None):
        raise UserError("--ledger credits collaborative training: add --swarm")
    from swarmlm.parallel.launch import run_parallel_training, wants_parallel
    if wants_parallel(args):
        return run_parallel_training(args)
    from swarmlm.train.loop import train_from_args
    return train_from_args(args)


# ---- generate -----------------------------------------------------------------------------

def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a model directory (or through the swarm)")
    p.add_argument("model", help="a checkpoint directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--swarm", action="store_true", help="run the blocks through the swarm's servers")
    p.add_argument("--private", action="store_true",
                   help="secret-share the tokens among three MPC parties of the swarm (swarmlm mpc-party)")
    p.add_argument("--initial-peers", nargs="*", default=[], metavar="MADDR", help="with --swarm: join through these")
    p.add_argument("--connect-timeout", type=float, default=60.0,
                   help="with --swarm: seconds to wait until every block is served")
    _add_ledger_flags(p, "with --swarm: sign receipts for the servers of this ledger (account in $SWARMLM_HOME)")
    p.add_argument("--quantize", default=None, metavar="int8|int4[-gN]",
                   help="quantize the weights at load time (int8 per row; int4 per group of N=32/64/128 columns)")
    p.set_defaults(run=_run_generate)


def _run_generate(args) -> int:
    if args.private:
        from swarmlm.privacy.mpc.remote import generate_private_from_args
        return generate_private_from_args(args)
    if args.ledger and not args.swarm:
        raise UserError("--ledger meters swarm use: add --swarm")
    if args.swarm:
        from swarmlm.swarm.client.model import generate_from_args as swarm_generate_from_args
        if args.ledger:
            from swarmlm.ledger.commands import payer_from_args
            payer = payer_from_args(args)
            return swarm_generate_from_args(args, ticket=payer.ticket, ticket_accepted=payer.accepted)
        return swarm_generate_from_args(args)
    from swarmlm.model.t5_hf import is_t5
    if is_t5(args.model):  # the encoder-decoder family has its own decode loop
        from swarmlm.model.t5_generate import t5_generate_from_args
        return t5_generate_from_args(args)
    from swarmlm.model.generate import generate_from_args
    return generate_from_args(args)


# ---- node ---------------------------------------------------------------------------------

def _add_node(sub) -> None:
    p = sub.add_parser("node", help="run a peer that serves its block store, until SIGINT/SIGTERM")
    p.add_argument("--initial-peers", nargs="*", default=[], metavar="MADDR", help="join the swarm through these")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=0, help="TCP port (default: any free one)")
    p.add_argument("--data-dir", default=None, help="identity and block store (default: $SWARMLM_HOME or ~/.swarmlm)")
    p.add_argument("--max-store-bytes", type=int, default=None, help="collect unpinned blocks above this size")
    p.add_argument("--announce-interval", type=float, default=30.0, help="seconds between provider record refreshes")
    p.add_argument("--replication-interval", type=float, default=30.0, help="seconds between replica checks")
    p.set_defaults(run=_run_node)


def _run_node(args) -> int:
    from swarmlm.store.commands import node_from_args
    return node_from_args(args)


# ---- store --------------------------------------------------------------------------------
# `swarmlm store <command>`: each command has an `_add_store_<command>(store_sub)`, listed in
# `_add_store`, and sets its own `run`.

def _add_store(sub) -> None:
    p = sub.add_parser("store", help="the content-addressed block store")
    store_sub = p.add_subparsers(dest="store_command", required=True)
    for add in (_add_store_add, _add_store_ls, _add_store_publish_model, _add_store_cat, _add_store_get,
                _add_store_pin):
        add(store_sub)


_DATA_DIR_HELP = "data directory; blocks live in <D>/blocks (default: $SWARMLM_HOME, else ~/.swarmlm)"


def _add_store_add(store_sub) -> None:
    p = store_sub.add_parser("add", help="add a file to the local store and pin it; prints its CID last")
    p.add_argument("file")
    p.add_argument("--data-dir", default=None, help=_DATA_DIR_HELP)
    p.add_argument("--cid-version", type=int, choices=[0, 1], default=1,
                   help="1: raw leaves, CIDv1 (ipfs add --cid-version=1); 0: legacy ipfs add")
    p.set_defaults(run=_run_store_add)


def _run_store_add(args) -> int:
    from swarmlm.store.local import add_from_args
    return add_from_args(args)


def _add_store_ls(store_sub) -> None:
    p = store_sub.add_parser("ls", help="list the local store: CID, bytes, pinned")
    p.add_argument("--data-dir", default=None, help=_DATA_DIR_HELP)
    p.add_argument("--pins", action="store_true", help="only the pinned roots, with their file sizes")
    p.set_defaults(run=_run_store_ls)


def _run_store_ls(args) -> int:
    from swarmlm.store.local import ls_from_args
    return ls_from_args(args)


def _add_store_publish_model(store_sub) -> None:
    p = store_sub.add_parser("publish-model", help="add a checkpoint directory per block under a manifest; "
                                                   "prints the manifest CID last")
    p.add_argument("model_dir")
    p.add_argument("--data-dir", default=None, help=_DATA_DIR_HELP)
    p.add_argument("--name", default=None, help="a label for the model (default: the directory name)")
    p.set_defaults(run=_run_store_publish_model)


def _run_store_publish_model(args) -> int:
    from swarmlm.store.local import publish_from_args
    return publish_from_args(args)


def _add_store_cat(store_sub) -> None:
    p = store_sub.add_parser("cat", help="write a file from the local store (no network), verified")
    p.add_argument("cid")
    p.add_argument("-o", "--output", default=None, help="output file (default: stdout)")
    p.add_argument("--data-dir", default=None, help=_DATA_DIR_HELP)
    p.set_defaults(run=_run_store_cat)


def _run_store_cat(args) -> int:
    from swarmlm.store.local import cat_from_args
    return cat_from_args(args)


def _add_store_get(store_sub) -> None:
    p = store_sub.add_parser("get", help="fetch a file by CID from the swarm, verified")
    p.add_argument("cid")
    p.add_argument("-o", "--output", default=None, help="output file (default: stdout)")
    p.add_argument("--data-dir", default=None, help="block store to fetch into (default: $SWARMLM_HOME or ~/.swarmlm)")
    p.add_argument("--initial-peers", nargs="+", required=True, metavar="MADDR")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for any one block")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(run=_run_store_get)


def _run_store_get(args) -> int:
    from swarmlm.store.commands import get_from_args
    return get_from_args(args)


def _add_store_pin(store_sub) -> None:
    p = store_sub.add_parser("pin", help="make sure at least R peers of the swarm hold a CID")
    p.add_argument("cid")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--initial-peers", nargs="+", required=True, metavar="MADDR")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a peer may take to fetch and pin")
    p.add_argument("--data-dir", default=None,
                   help="accepted like the other store commands; pin keeps nothing locally (it joins the "
                        "swarm with a throwaway identity and asks peers to hold the CID)")
    p.set_defaults(run=_run_store_pin)


def _run_store_pin(args) -> int:
    from swarmlm.store.commands import pin_from_args
    return pin_from_args(args)


# ---- serve --------------------------------------------------------------------------------

def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve a span of a model's blocks to the swarm, until SIGINT/SIGTERM")
    p.add_argument("model", help="a checkpoint directory or a model manifest CID")
    span = p.add_mutually_exclusive_group()   # one of them, or --max-memory alone (checked in ServeOptions)
    span.add_argument("--blocks", default=None, metavar="START:END", help="serve blocks [START, END)")
    span.add_argument("--num-blocks", type=int, default=None, metavar="N",
                      help="serve N blocks where the swarm needs them most, moving when it would balance better")
    p.add_argument("--initial-peers", nargs="*", default=[], metavar="MADDR", help="join the swarm through these")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=0, help="TCP port (default: any free one)")
    p.add_argument("--data-dir", default=None, help="identity and fetched blocks (default: $SWARMLM_HOME or ~/.swarmlm)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-sessions", type=int, default=64, help="inference sessions open at once")
    p.add_argument("--max-cache-tokens", type=int, default=65536, help="KV cache positions over all sessions")
    p.add_argument("--announce-ttl", type=float, default=30.0, help="seconds a DHT announcement lives")
    p.add_argument("--rebalance-period", type=float, default=30.0, help="seconds between span reconsiderations")
    p.add_argument("--join-delay", type=float, default=0.0, help="with --num-blocks: wait up to this long first")
    p.add_argument("--no-direct", dest="direct", action="store_false",
                   help="offer no encrypted direct TCP steps channel (clients step over libp2p streams)")
    _add_ledger_flags(p, "admit sessions by this ledger's quotas, deposits and priority slots")
    p.add_argument("--quantize", default=None, metavar="int8|int4[-gN]",
                   help="quantize the weights at load time (int8 per row; int4 per group of N=32/64/128 columns)")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="e.g. 512MB: serve only as many blocks (and cache) as fit in this much memory")
    p.set_defaults(run=_run_serve)


def _run_serve(args) -> int:
    from swarmlm.swarm.server.serve import serve_from_args
    if args.ledger:
        from swarmlm.ledger.commands import gate_from_args
        gate = gate_from_args(args)
        return serve_from_args(args, admit=gate.admit, background=gate.run_forever)
    return serve_from_args(args)


# ---- ledger ---------------------------------------------------------------------------------

def _add_ledger_flags(p, what: str) -> None:
    p.add_argument("--ledger", default=None, metavar="ADDR", help=what)
    p.add_argument("--chain-rpc", default="http://127.0.0.1:8545", metavar="URL", help="Ethereum JSON-RPC node")


def _add_ledger(sub) -> None:
    p = sub.add_parser("ledger", help="fair access on an EVM ledger: dev chain, deploy, status, deposits, auctions")
    verbs = p.add_subparsers(dest="ledger_verb", required=True)
    c = verbs.add_parser("chain", help="run the embedded dev chain (py-evm) on loopback; prints its RPC URL")
    c.add_argument("--host", default="127.0.0.1")
    c.add_argument("--port", type=int, default=8545, help="0: any free port")
    c.set_defaults(run=lambda a: _ledger("chain_from_args", a))
    specs = {
        "deploy": "deploy a new ledger; prints its address last",
        "status": "epoch, credit, quota, balances of an account",
        "fund": "dev chains only: give the data dir's account 100 ether",
        "register": "bind the data dir's ledger account to its swarm peer ID",
        "deposit": "lock wei as deposit, spent on use over the quota",
        "bid": "commit a sealed bid for a priority slot",
        "reveal": "reveal the sealed bid",
        "settle": "settle the receipts this server holds (or --auction EPOCH)",
        "withdraw": "claim auction refunds and withdraw what is owed (--unlock to start freeing deposit)",
        "advance": "dev chains only: move the chain's clock forward",
        "round": "co-sign a training round's record (JSON file); --submit records it once all members signed",
    }
    for verb, what in specs.items():
        q = verbs.add_parser(verb, help=what)
        q.add_argument("--chain-rpc", required=True, metavar="URL")
        q.add_argument("--data-dir", default=None, help="whose ledger key (default: $SWARMLM_HOME)")
        if verb not in ("deploy", "fund", "advance"):
            q.add_argument("--ledger", required=True, metavar="ADDR")
        q.set_defaults(run=lambda a, v=verb: _ledger(f"{v}_from_args", a))
    d = verbs.choices["deploy"]
    d.add_argument("--epoch-seconds", type=int, default=3600)
    d.add_argument("--free-tokens", type=int, default=1000)
    d.add_argument("--slots", type=int, default=2)
    d.add_argument("--price", type=int, default=10 ** 9, help="wei per token over the quota")
    d.add_argument("--quota-per-credit", type=int, default=1)
    d.add_argument("--sample-credit", type=int, default=1)
    d.add_argument("--dispute-seconds", type=int, default=600)
    verbs.choices["status"].add_argument("--json", action="store_true")
    verbs.choices["status"].add_argument("--account", default=None, help="another account than the data dir's")
    verbs.choices["register"].add_argument("--server", action="store_true", help="as a server (earns credit)")
    verbs.choices["deposit"].add_argument("--amount", type=int, required=True, help="wei")
    for verb in ("bid", "reveal"):
        verbs.choices[verb].add_argument("--epoch", type=int, default=None, help="the slot's epoch (default: next)")
    verbs.choices["bid"].add_argument("--amount", type=int, required=True, help="wei")
    verbs.choices["bid"].add_argument("--escrow", type=int, default=None, help="wei sent (>= amount; hides it)")
    verbs.choices["settle"].add_argument("--now", action="store_true", help="this epoch's channels too (closing them)")
    verbs.choices["settle"].add_argument("--auction", type=int, default=None, metavar="EPOCH")
    verbs.choices["withdraw"].add_argument("--unlock", type=int, default=0, help="wei of deposit to start unlocking")
    verbs.choices["advance"].add_argument("--seconds", type=int, required=True)
    verbs.choices["round"].add_argument("file", help="the round's record: run, round, epoch, members, samples")
    verbs.choices["round"].add_argument("--submit", action="store_true")


def _ledger(name: str, args) -> int:
    from swarmlm.ledger import commands
    return getattr(commands, name)(args)


# ---- mpc-party ----------------------------------------------------------------------------

def _add_mpc_party(sub) -> None:
    p = sub.add_parser("mpc-party", help="compute private (MPC) inference of a model with two other parties")
    p.add_argument("model", help="a checkpoint directory or a model manifest CID")
    p.add_argument("--initial-peers", nargs="*", default=[], metavar="MADDR", help="join the swarm through these")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=0, help="TCP port (default: any free one)")
    p.add_argument("--data-dir", default=None, help="identity and fetched blocks (default: $SWARMLM_HOME or ~/.swarmlm)")
    p.add_argument("--max-tokens", type=int, default=256, help="prompt plus generated tokens per session")
    p.add_argument("--max-sessions", type=int, default=8, help="sessions open at once")
    p.add_argument("--peer-timeout", type=float, default=8.0, help="seconds to wait for another party mid-step")
    p.set_defaults(run=_run_mpc_party)


def _run_mpc_party(args) -> int:
    from swarmlm.privacy.mpc.party import mpc_party_from_args
    return mpc_party_from_args(args)


# ---- finetune -----------------------------------------------------------------------------

def _add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="train prompts and LoRA adapters on the client, blocks frozen (or in the swarm)")
    p.add_argument("model", help="a checkpoint directory (or, with --swarm, a manifest CID)")
    p.add_argument("--data", required=True, help="a text file to train on")
    p.add_argument("--out", required=True, help="where to write adapters.safetensors and metrics.jsonl")
    p.add_argument("--swarm", action="store_true", help="run the blocks through the swarm's servers")
    p.add_argument("--initial-peers", nargs="*", default=[], metavar="MADDR", help="with --swarm: join through these")
    p.add_argument("--connect-timeout", type=float, default=60.0,
                   help="with --swarm: seconds to wait until every block is served")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--prompt-len", type=int, default=16, help="trainable prompt positions (0: no prompt tuning)")
    p.add_argument("--deep-prompts", action="store_true", help="also train prompts before every block")
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA rank on the lm head (0: none)")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quantize", default=None, metavar="int8|int4[-gN]",
                   help="quantize the weights at load time (int8 per row; int4 per group of N=32/64/128 columns)")
    p.set_defaults(run=_run_finetune)


def _run_finetune(args) -> int:
    from swarmlm.swarm.finetune import finetune_from_args
    return finetune_from_args(args)


# ---- eval ---------------------------------------------------------------------------------

def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a checkpoint on a text (windows of the model's context)")
    p.add_argument("model", help="a checkpoint directory")
    p.add_argument("--data", required=True, help="a text file")
    p.add_argument("--window", type=int, default=0, help="tokens per window (default: the model's context)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward")
    p.add_argument("--json", action="store_true", help='print {"tokens", "nll", "perplexity", ...}')
    p.add_argument("--quantize", default=None, metavar="int8|int4[-gN]",
                   help="quantize the weights at load time (int8 per row; int4 per group of N=32/64/128 columns)")
    p.set_defaults(run=_run_eval)


def _run_eval(args) -> int:
    from swarmlm.model.evaluate import eval_from_args
    return eval_from_args(args)


# ---- api ----------------------------------------------------------------------------------

def _add_api(sub) -> None:
    p = sub.add_parser("api", help="an OpenAI-compatible HTTP API over a model directory (or the swarm)")
    p.add_argument("model", help="a checkpoint directory (or, with --swarm, a manifest CID)")
    p.add_argument("--swarm", action="store_true", help="run the blocks through the swarm's servers")
    p.add_argument("--initial-peers", nargs="*", default=[], metavar="MADDR", help="with --swarm: join through these")
    p.add_argument("--connect-timeout", type=float, default=60.0,
                   help="with --swarm: seconds to wait until every block is served")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0 picks a free one)")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on every request")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quantize", default=None, metavar="int8|int4[-gN]",
                   help="quantize the weights at load time (int8 per row; int4 per group of N=32/64/128 columns)")
    _add_ledger_flags(p, "with --swarm: sign receipts for the servers of this ledger (account in $SWARMLM_HOME); "
                         "a refusal is HTTP 429")
    p.set_defaults(run=_run_api)


def _run_api(args) -> int:
    from swarmlm.api.run import api_from_args
    if args.ledger:
        if not args.swarm:
            raise UserError("--ledger meters swarm use: add --swarm")
        from swarmlm.ledger.commands import payer_from_args
        payer = payer_from_args(args)
        return api_from_args(args, ticket=payer.ticket, ticket_accepted=payer.accepted, pay_for=payer.pay_for)
    return api_from_args(args)


# ---- fl -----------------------------------------------------------------------------------
# `swarmlm fl coordinate|join`: federated learning (swarmlm.privacy)

def _add_fl(sub) -> None:
    p = sub.add_parser("fl", help="federated learning: data stays with its owner; secure aggregation, DP")
    fl_sub = p.add_subparsers(dest="fl_command", required=True)
    c = fl_sub.add_parser("coordinate", help="run the rounds of a federated run; the model ends in --out")
    c.add_argument("model_dir", help="the initial model (a checkpoint directory with tokenizer.json)")
    c.add_argument("--rounds", type=int, required=True)
    c.add_argument("--clients-per-round", type=int, required=True, metavar="K")
    c.add_argument("--min-clients", type=int, default=None, metavar="M", help="a round needs this many (default 2)")
    c.add_argument("--start-clients", type=int, default=None, metavar="N",
                   help="wait for N clients before the first round (default: --min-clients)")
    c.add_argument("--local-steps", type=int, default=5, metavar="E")
    c.add_argument("--fedprox", type=float, default=0.0, metavar="MU", help="FedProx proximal weight (0: FedAvg)")
    c.add_argument("--secure-aggregation", action="store_true", help="the coordinator learns only the sum")
    c.add_argument("--dp-clip", type=float, default=None, metavar="C", help="client-level DP: clip each update to C")
    c.add_argument("--dp-noise", type=float, default=None, metavar="SIGMA", help="noise multiplier of the sum")
    c.add_argument("--dp-delta", type=float, default=1e-5, metavar="D")
    c.add_argument("--dp-sgd-clip", type=float, default=None, metavar="C",
                   help="sample-level DP-SGD in clients' training: clip each example's gradient to C")
    c.add_argument("--dp-sgd-noise", type=float, default=None, metavar="SIGMA", help="DP-SGD's noise multiplier")
    c.add_argument("--lr", type=float, default=0.3, help="clients' local SGD learning rate")
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--seq-len", type=int, default=64)
    c.add_argument("--coord-clip", type=float, default=4.0, help="each update coordinate is clipped to this")
    c.add_argument("--lora-rank", type=int, default=0, metavar="R",
                   help="exchange only LoRA adapters of rank R on q/v (A frozen, B trained); 0: the whole model")
    c.add_argument("--round-timeout", type=float, default=120.0, metavar="S", help="bound on each stage of a round")
    c.add_argument("--out", required=True, help="rounds.jsonl and the final checkpoint")
    _add_fl_common(c)
    c.set_defaults(run=_run_fl_coordinate)
    j = fl_sub.add_parser("join", help="take part in a federated run with local data that never leaves this peer")
    j.add_argument("--data", required=True, help="a text file or directory: this client's private data")
    _add_fl_common(j)
    j.set_defaults(run=_run_fl_join)


def _add_fl_common(p) -> None:
    p.add_argument("--run-id", required=True)
    p.add_argument("--initial-peers", nargs="*", default=[], metavar="MADDR")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="identity and block store (default: $SWARMLM_HOME or ~/.swarmlm)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)


def _run_fl_coordinate(args) -> int:
    from swarmlm.privacy.commands import coordinate_from_args
    return coordinate_from_args(args)


def _run_fl_join(args) -> int:
    from swarmlm.privacy.commands import join_from_args
    return join_from_args(args)
# ---- dashboard ----------------------------------------------------------------------------

def _add_dashboard(sub) -> None:
    p = sub.add_parser("dashboard", help="a live web page of the swarm: models, servers, holes, runs, store")
    p.add_argument("--initial-peers", nargs="*", default=[], metavar="MADDR", help="join the swarm through these")
    p.add_argument("--host", default="127.0.0.1", help="interface the page is served on")
    p.add_argument("--port", type=int, default=8080, help="port of the page (0 picks a free one)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between looks at the swarm")
    p.add_argument("--ledger", default=None, metavar="ADDRESS", help="also show this ledger's epoch, credit and quota")
    p.add_argument("--chain-rpc", default=None, metavar="URL", help="the ledger's Ethereum JSON-RPC node")
    p.set_defaults(run=_run_dashboard)


def _run_dashboard(args) -> int:
    from swarmlm.dashboard.run import dashboard_from_args
    return dashboard_from_args(args)


# ---- simulate -----------------------------------------------------------------------------

def _add_simulate(sub) -> None:
    p = sub.add_parser("simulate", help="simulate a swarm of thousands of peers with swarmlm's own decisions")
    p.add_argument("scenario", help="a scenario TOML file (see scenarios/)")
    p.add_argument("--measure", default=None, metavar="MODEL_DIR",
                   help="first measure this machine's compute per block and loopback RTT with this model")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=_run_simulate)


def _run_simulate(args) -> int:
    from swarmlm.sim.run import simulate_from_args
    return simulate_from_args(args)


def _add_metrics_flag(p) -> None:
    """`--metrics-port P` on a long-running verb; `main` exposes the metrics before the verb runs."""
    p.add_argument("--metrics-port", type=int, default=None, metavar="P",
                   help="serve Prometheus metrics at http://127.0.0.1:P/metrics (0 picks a free port)")


# ---- entry point --------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarmlm", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default: $SWARMLM_LOG or WARNING)")
    sub = parser.add_subparsers(dest="verb", required=True)
    for add in (_add_demo, _add_train, _add_generate, _add_node, _add_store, _add_serve, _add_mpc_party,
                _add_finetune, _add_api, _add_fl, _add_ledger, _add_eval, _add_dashboard, _add_simulate):
        add(sub)
    for verb in ("node", "serve", "train", "mpc-party"):          # long-running verbs
        _add_metrics_flag(sub.choices[verb])
    fl = next(a for a in sub.choices["fl"]._actions if isinstance(a, argparse._SubParsersAction))
    for role in ("coordinate", "join"):
        _add_metrics_flag(fl.choices[role])
    return parser


_RUN_MODELS = frozenset({"demo", "train", "generate", "serve", "mpc-party", "finetune", "eval", "api", "fl"})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from swarmlm import log
    log.configure(args.log_level)
    if args.verb in _RUN_MODELS:
        from swarmlm.model import qkernels
        qkernels.prepare()                  # before any thread of the command: see its docstring
    try:
        if getattr(args, "metrics_port", None) is not None:
            from swarmlm.dashboard.metrics import expose
            expose(args.metrics_port)
        return int(args.run(args) or 0)
    except SwarmlmError as e:
        print(f"{_command(args)}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.filename is None:              # not about a path the user named: a bug, keep its traceback
            raise
        print(f"{_command(args)}: error: {e.strerror or e}: {e.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{_command(args)}: interrupted", file=sys.stderr)
        return 130


def _command(args) -> str:
    """The command as typed: "swarmlm store cat" for a store or fl command, else "swarmlm VERB"."""
    sub = getattr(args, "store_command", None) or getattr(args, "fl_command", None)
    return f"swarmlm {args.verb}" + (f" {sub}" if sub else "")


def one_line(error: BaseException) -> str:
    """The error's message on one line (a peer's multi-line message folded; the type if it has none)."""
    text = " ".join(part.strip() for part in str(error).splitlines() if part.strip())
    return text or type(error).__name__
