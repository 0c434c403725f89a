"""`swarmlm api MODEL [--swarm ...]`: load the model (or join the swarm), then serve the API until
SIGINT/SIGTERM, printing the base URL as the last line once it accepts connections."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

from swarmlm.errors import UserError


def model_name(model: str) -> str:
    """The id clients name in requests: a directory's own name, or the manifest CID as given."""
    path = Path(model).expanduser()
    return path.resolve().name if path.is_dir() else model


def build_app(backend: Any, directory: str | Path, name: str, *, api_key: str | None, eos_id: int | None):
    from swarmlm.api.chat import ChatTemplate
    from swarmlm.api.server import ApiApp
    from swarmlm.model.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(directory)
    eos = eos_id if eos_id is not None else tokenizer.eos_id
    return ApiApp(backend, tokenizer, name, eos_id=eos, chat_template=ChatTemplate.load(directory), api_key=api_key)


def api_from_args(args: Any, *, ticket: Any = None, ticket_accepted: Any = None, pay_for: Any = None) -> int:
    """`ticket`, `ticket_accepted`, `pay_for` (with --swarm --ledger; cli.py passes the ledger's): the
    sessions' tickets, as for `generate --swarm --ledger`; a server's refusal answers HTTP 429."""
    from swarmlm.api.backends import LocalBackend, SwarmBackend
    from swarmlm.model.generate import DTYPES

    if args.api_key is not None and not args.api_key:
        raise UserError("--api-key must not be empty")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be 0..65535, got {args.port}")
    dtype = DTYPES[args.dtype]
    from swarmlm.model.quant import parse_scheme, quantize_model
    scheme = parse_scheme(getattr(args, "quantize", None))
    if args.swarm:
        from swarmlm.swarm.client.model import RemoteModel
        if not args.initial_peers:
            raise UserError("--swarm needs --initial-peers MADDR ...")
        options = None
        if ticket is not None:
            from swarmlm.swarm.client.remote import ClientOptions
            from swarmlm.swarm.client.session import SessionOptions
            options = ClientOptions(connect_timeout_s=args.connect_timeout,
                                    session=SessionOptions(ticket=ticket, ticket_accepted=ticket_accepted))
        remote = RemoteModel.connect(args.model, initial_peers=args.initial_peers,
                                     connect_timeout_s=args.connect_timeout, dtype=dtype, quantization=scheme.name,
                                     options=options)
        try:
            api = build_app(SwarmBackend(remote, pay_for=pay_for), remote.source_dir, model_name(args.model), api_key=args.api_key,
                            eos_id=remote.cfg.eos_token_id)
            _serve_until_stopped(api, args.host, args.port)
        finally:
            remote.close()
        return 0
    from swarmlm.model.hf import load_model
    if not Path(args.model).expanduser().is_dir():
        raise UserError(f"no model directory at {args.model} (without --swarm MODEL is a checkpoint directory)")
    model, cfg = load_model(args.model, dtype=dtype)
    model.requires_grad_(False)
    quantize_model(model, scheme)
    api = build_app(LocalBackend(model), args.model, model_name(args.model), api_key=args.api_key,
                    eos_id=cfg.eos_token_id)
    _serve_until_stopped(api, args.host, args.port)
    return 0


def _serve_until_stopped(api: Any, host: str, port: int) -> None:
    from swarmlm.api.server import serve

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(api.app, host, port, stop=stop, on_ready=lambda url: print(url, flush=True))

    asyncio.run(main())
