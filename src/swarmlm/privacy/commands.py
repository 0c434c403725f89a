"""`swarmlm fl coordinate` and `swarmlm fl join`, as cli.py calls them: arguments in, exit code out.

Both print their peer's multiaddrs first (one a line, as `swarmlm node` does), so other peers
can join through them, then a line per event: clients joining, each round (clients, dropped,
loss, ε so far), the end.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from swarmlm.errors import UserError
from swarmlm.privacy.federated import FlConfig, check_dp_sgd


def config_from_args(args: Any) -> FlConfig:
    if (args.dp_clip is None) != (args.dp_noise is None):
        raise UserError("--dp-clip and --dp-noise go together")
    if (args.dp_sgd_clip is None) != (args.dp_sgd_noise is None):
        raise UserError("--dp-sgd-clip and --dp-sgd-noise go together")
    if args.dp_sgd_clip is not None:
        check_dp_sgd(args.dp_sgd_clip, args.dp_sgd_noise, args.dp_delta)
    try:
        return FlConfig(rounds=args.rounds, clients_per_round=args.clients_per_round,
                        min_clients=args.min_clients if args.min_clients is not None else min(2, args.clients_per_round),
                        local_steps=args.local_steps, fedprox_mu=args.fedprox, lr=args.lr,
                        batch_size=args.batch_size, seq_len=args.seq_len, secure=args.secure_aggregation,
                        coord_clip=args.coord_clip, dp_clip=args.dp_clip or 0.0, dp_noise=args.dp_noise or 0.0,
                        dp_delta=args.dp_delta, dp_sgd_clip=args.dp_sgd_clip or 0.0,
                        dp_sgd_noise=args.dp_sgd_noise or 0.0, seed=args.seed, round_timeout_s=args.round_timeout,
                        lora_rank=args.lora_rank).check()
    except ValueError as e:
        raise UserError(str(e)) from None


def coordinate_from_args(args: Any) -> int:
    cfg = config_from_args(args)
    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir} is not a checkpoint directory (no config.json)")
    return asyncio.run(_coordinate(args, cfg, model_dir))


async def _coordinate(args: Any, cfg: FlConfig, model_dir: Path) -> int:
    from swarmlm.model.hf import load_model
    from swarmlm.model.tokenizer import Tokenizer
    from swarmlm.p2p.peer import Peer
    from swarmlm.privacy.coordinator import Coordinator
    from swarmlm.store.dag import open_store
    from swarmlm.store.node import StoreNode

    model, model_cfg = load_model(model_dir)
    tokenizer = Tokenizer.load(model_dir) if (model_dir / "tokenizer.json").is_file() else None
    if tokenizer is None:
        raise UserError(f"{model_dir} has no tokenizer.json: clients could not read their text")
    peer = await Peer.create(initial_peers=args.initial_peers, host=args.host, port=args.port, data_dir=args.data_dir)
    try:
        for maddr in peer.maddrs:
            print(maddr, flush=True)
        node = StoreNode(peer, open_store(args.data_dir))
        await node.start()
        try:
            coord = Coordinator(peer, node.store, node, cfg, run_id=args.run_id, model=model, model_cfg=model_cfg,
                                tokenizer=tokenizer, out=Path(args.out), printer=lambda s: print(s, flush=True))
            await coord.start()
            await coord.publish(0)          # announce the run at once: clients find it while we wait for them
            final = await coord.run(start_clients=args.start_clients or 0)
            print(f"fl: {cfg.rounds} rounds done; model in {final}, rounds in {final / 'rounds.jsonl'}", flush=True)
        finally:
            await node.close()
        return 0
    finally:
        await peer.shutdown()


def join_from_args(args: Any) -> int:
    if not Path(args.data).exists():
        raise UserError(f"{args.data}: no such file or directory")
    return asyncio.run(_join(args))


async def _join(args: Any) -> int:
    from swarmlm.p2p.peer import Peer
    from swarmlm.privacy.participant import Participant

    peer = await Peer.create(initial_peers=args.initial_peers, host=args.host, port=args.port, data_dir=args.data_dir)
    try:
        for maddr in peer.maddrs:
            print(maddr, flush=True)
        stop_in = _kill_hook()
        client = Participant(peer, run_id=args.run_id, data=args.data, data_dir=args.data_dir, seed=args.seed,
                             printer=lambda s: print(s, flush=True), stop_in=stop_in)
        return await client.run()
    finally:
        await peer.shutdown()


def _kill_hook():
    """Tests only: SWARMLM_FL_DIE_AT="STAGE[:ROUND]" makes this client SIGKILL itself as that stage
    begins (train, update, setup, share_keys, collect_masked, unmask), in round ROUND (default 1)."""
    spec = os.environ.get("SWARMLM_FL_DIE_AT")
    if not spec:
        return None
    stage, _, nth = spec.partition(":")
    seen = {"n": 0}
    want = int(nth or 1)

    def hook(current: str) -> None:
        if current == stage:
            seen["n"] += 1
            if seen["n"] == want:
                import signal
                os.kill(os.getpid(), signal.SIGKILL)
    return hook
