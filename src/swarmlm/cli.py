"""The `swarmlm` command: parses `swarmlm <verb> ...` and calls one library function per verb.

Each verb has an `_add_<verb>` (its arguments) and a `_run_<verb>` (the call). Library code
raises `UserError` for bad input; `main` prints it as one line and exits 2, never a traceback.
Heavy imports happen inside `_run_*`, so `swarmlm --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys

from swarmlm.errors import SwarmlmError, UserError


# ---- demo ---------------------------------------------------------------------------------

def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="train a tiny model on the embedded corpus and generate from it")
    p.add_argument("--peers", type=int, default=3, help="peer processes in the local swarm")
    p.add_argument("--steps", type=int, default=200, help="training steps")
    p.add_argument("--out", default=None, help="where to keep the run (default: a temporary folder)")
    p.set_defaults(run=_run_demo)


def _run_demo(args) -> int:
    from swarmlm.demo import run_demo
    return run_demo(peers=args.peers, steps=args.steps, out=args.out)


# ---- train --------------------------------------------------------------------------------

def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model (one process, torchrun, or the swarm)")
    p.add_argument("--config", default="tiny", help="preset name (tiny, small) or a TOML config file")
    p.add_argument("--data", default=None, help="corpus: a text file or directory (default: the Python stdlib)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--out", default=None, help="run directory: checkpoint, metrics.jsonl (default: runs/<config>)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_train)


def _run_train(args) -> int:
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
    p.set_defaults(run=_run_generate)


def _run_generate(args) -> int:
    from swarmlm.model.generate import generate_from_args
    return generate_from_args(args)


# ---- entry point --------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarmlm", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default: $SWARMLM_LOG or WARNING)")
    sub = parser.add_subparsers(dest="verb", required=True)
    for add in (_add_demo, _add_train, _add_generate):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from swarmlm import log
    log.configure(args.log_level)
    try:
        return int(args.run(args) or 0)
    except UserError as e:
        print(f"swarmlm {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except SwarmlmError as e:
        print(f"swarmlm {args.verb}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"swarmlm {args.verb}: interrupted", file=sys.stderr)
        return 130
