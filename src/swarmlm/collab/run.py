"""`swarmlm train --swarm`: one peer of a collaborative training run, from the command line.

    swarmlm train --swarm --run-id demo --initial-peers /ip4/127.0.0.1/tcp/PORT/p2p/ID \\
                  [--target-batch N] [--diloco H] [--compression int8] [--aggregator centered-clip]

Prepares the data like `swarmlm train`, starts a `Peer`, prints its multiaddrs (one a line,
so others can join through it), downloads the state if the run is already going, and trains
with a `CollaborativeOptimizer` until the swarm reaches `--steps` (global steps; with
`--diloco H`, local steps). Each peer reads its own windows of the corpus (`Batches` stream
derived from its peer ID). A progress bar shows swarm size, global step, samples/s and
loss; `--out` gets `metrics.jsonl` (one line per step: step, loss, samples, peers) and the
final checkpoint. With `--publish-every N`, the peer holding the reference model publishes
it into its block store every N global steps and records the manifest CID in the DHT
(`keys.collab_model_key`), where servers can find the latest model.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from swarmlm.collab import metrics
from swarmlm.collab.optimizer import CollabOptions, CollaborativeOptimizer
from swarmlm.collab.progress import reference_peer
from swarmlm.errors import UserError
from swarmlm.log import get_logger
from swarmlm.p2p import keys
from swarmlm.p2p.records import record_type

log = get_logger(__name__)


@record_type("collab.model")
@dataclass(frozen=True)
class ModelRecord:
    manifest_cid: str         # CID of the published model's manifest (store/manifest.py)
    step: int                 # global step the weights belong to
    samples: float            # samples behind them, summed over the swarm


def check_swarm_args(args: Any) -> None:
    if not getattr(args, "run_id", None):
        raise UserError("--swarm needs --run-id NAME (peers with the same run ID train together)")
    for name in ("target_batch", "diloco", "publish_every", "min_peers"):
        value = getattr(args, name, None)
        if value is not None and value < 0:
            raise UserError(f"--{name.replace('_', '-')} must not be negative, got {value}")
    if args.round_timeout is not None and not args.round_timeout > 0:
        raise UserError(f"--round-timeout must be positive, got {args.round_timeout}")


def run_swarm_training(args: Any, cosigner: Any = None) -> int:
    """`swarmlm train --swarm ...`: returns the exit code. `cosigner` (witness.Cosigner, from
    `--ledger`): every successful round's record is co-signed by its members and submitted."""
    from swarmlm.train.config import load_run_config
    from swarmlm.train.loop import prepare_data

    check_swarm_args(args)
    run = load_run_config(args.config, steps=args.steps, seed=args.seed, batch_size=args.batch_size,
                          seq_len=args.seq_len)
    prep = prepare_data(run, args.data, progress=not args.no_progress)
    return asyncio.run(_train(args, run, prep, cosigner))


def stream_of(peer_id: str) -> int:
    """A data stream number for a peer: different peers read different windows."""
    return int.from_bytes(hashlib.sha256(peer_id.encode()).digest()[:4], "little")


async def _train(args: Any, run: Any, prep: Any, cosigner: Any = None) -> int:
    from swarmlm.data.shards import Batches, eval_windows
    from swarmlm.model.transformer import Transformer
    from swarmlm.p2p.peer import Peer
    from swarmlm.train.loop import evaluate, lm_loss
    from swarmlm.train.optim import build_optimizer, lr_at

    cfg = run.train
    peer = await Peer.create(initial_peers=args.initial_peers or [], host=args.host or "127.0.0.1",
                             port=args.port or 0, data_dir=args.data_dir)
    try:
        for maddr in peer.maddrs:
            print(maddr, flush=True)
        torch.manual_seed(cfg.seed)
        model = Transformer(prep.model_cfg)
        options = CollabOptions(
            run_id=args.run_id, micro_batch=cfg.batch_size, target_batch=args.target_batch or None,
            diloco_steps=args.diloco or 0, compression=args.compression, aggregator=args.aggregator,
            transport=getattr(args, "collab_transport", None) or "auto",
            grad_clip=cfg.grad_clip, round_timeout_s=args.round_timeout or 30.0,
            gather_timeout_s=min(5.0, (args.round_timeout or 30.0) / 3))
        opt = await CollaborativeOptimizer.create(peer, model, build_optimizer(model, cfg), options,
                                                  lr_at=lambda step: lr_at(step, cfg), cosigner=cosigner)
        await opt.join()
        metrics.watch(opt)
        await _wait_for_peers(opt, args.min_peers or 0)
        batches = Batches(prep.shards.train, cfg.batch_size, cfg.seq_len, cfg.seed, stream=stream_of(peer.peer_id))
        publisher = await _Publisher.create(peer, args, prep) if args.publish_every else None
        try:
            losses = await _loop(opt, batches, cfg, args, lm_loss, publisher)
        finally:
            await opt.close()
            if publisher is not None:
                await publisher.node.close()
        windows = eval_windows(prep.shards.val, cfg.seq_len, cfg.eval_windows)
        val = evaluate(model, windows, cfg.batch_size)
        out = Path(args.out) if args.out else None
        if out is not None:
            from swarmlm.model.hf import save_model
            save_model(model, prep.model_cfg, out, tokenizer=prep.tokenizer)
            with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:  # noqa: ASYNC230 (one line, at the end)
                f.write(json.dumps({"step": opt.global_step, "loss": losses[-1] if losses else math.nan,
                                    "val_loss": val, "samples": opt.samples_seen, "final": True}) + "\n")
        print(f"trained {opt.global_step} global steps with up to {opt.swarm_size} peers: {opt.samples_seen:.0f} "
              f"samples, validation loss {val:.3f}; {opt.rounds_failed} failed rounds, {opt.catch_ups} state "
              f"downloads, {opt.reducer.bytes_sent / 1e6:.1f} MB sent" + (f"; checkpoint in {out}" if out else ""),
              flush=True)
        if opt.witness is not None:
            w = opt.witness
            print(f"round records: {w.signed} co-signed, {w.submitted} submitted by this peer, "
                  f"{len(w.refused)} unsigned" + (f" (last: {w.refused[-1]})" if w.refused else ""), flush=True)
        return 0
    finally:
        await peer.shutdown()


async def _wait_for_peers(opt: CollaborativeOptimizer, n: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while opt.swarm_size < n and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        await opt.refresh()


def _forward_backward(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, lm_loss: Any) -> float:
    loss = lm_loss(model, x, y)
    loss.backward()
    return float(loss.detach())


async def _loop(opt: CollaborativeOptimizer, batches: Any, cfg: Any, args: Any, lm_loss: Any,
                publisher: _Publisher | None) -> list[float]:
    diloco = bool(args.diloco)
    done = (lambda: opt.local_step >= cfg.steps) if diloco else (lambda: opt.global_step >= cfg.steps)
    out = Path(args.out) if args.out else None
    metrics = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        metrics = open(out / "metrics.jsonl", "w", encoding="utf-8")  # noqa: ASYNC230, SIM115 (closed below)
    bar = tqdm(total=cfg.steps, desc=f"swarm {args.run_id}", unit="step", disable=args.no_progress,
               dynamic_ncols=True)
    losses: list[float] = []
    step_losses: list[float] = []
    t0, seen0 = time.monotonic(), opt.samples_seen
    try:
        while not done():
            before = (opt.local_step if diloco else opt.global_step)
            step, micro = opt.data_index
            x, y = batches.get(step, micro)
            loss = await asyncio.to_thread(_forward_backward, opt.model, x, y, lm_loss)
            step_losses.append(loss)
            moved = await opt.step(len(x), loss)
            now_step = opt.local_step if diloco else opt.global_step
            if now_step == before and not moved:
                continue
            mean_loss = sum(step_losses) / len(step_losses)
            step_losses = []
            losses.append(mean_loss)
            if metrics is not None:
                metrics.write(json.dumps({"step": now_step, "loss": mean_loss, "samples": opt.samples_seen,
                                          "global_step": opt.global_step, "peers": opt.swarm_size,
                                          "time": time.monotonic() - t0}) + "\n")
                metrics.flush()
            rate = (opt.samples_seen - seen0) / max(time.monotonic() - t0, 1e-9)
            bar.set_postfix(peers=opt.swarm_size, step=opt.global_step, samples_s=f"{rate:.1f}", loss=f"{mean_loss:.3f}")
            bar.n = min(now_step, cfg.steps)
            bar.refresh()
            if (publisher is not None and moved and opt.global_step % args.publish_every == 0
                    and reference_peer(opt.view) == opt.peer.peer_id):
                await publisher.publish(opt)
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    return losses


class _Publisher:
    """Publishes the model into this peer's block store and announces it (store/ does the work)."""

    def __init__(self, peer: Any, args: Any, prep: Any, store: Any, node: Any):
        self.peer, self.args, self.prep, self.store, self.node = peer, args, prep, store, node

    @classmethod
    async def create(cls, peer: Any, args: Any, prep: Any) -> _Publisher:
        from swarmlm.store.dag import open_store
        from swarmlm.store.node import StoreNode
        store = open_store(args.data_dir)
        node = StoreNode(peer, store)
        await node.start()
        return cls(peer, args, prep, store, node)

    async def publish(self, opt: CollaborativeOptimizer) -> str:
        from swarmlm.model.hf import save_model
        from swarmlm.store.manifest import publish_model
        with tempfile.TemporaryDirectory(prefix="swarmlm-publish-") as tmp:
            save_model(opt.model, self.prep.model_cfg, Path(tmp), tokenizer=self.prep.tokenizer)
            cid = str(publish_model(self.store, tmp, name=f"{self.args.run_id}-step{opt.global_step}"))
        await self.node.announce_all()
        await self.peer.store(keys.collab_model_key(self.args.run_id),
                              ModelRecord(cid, opt.global_step, opt.samples_seen), ttl_s=3600.0,
                              subkey=self.peer.peer_id)
        log.info("published step %d as %s", opt.global_step, cid)
        return cid


async def latest_model(peer: Any, run_id: str) -> ModelRecord | None:
    """The most recent model a peer of `run_id` published, as recorded in the DHT."""
    found = [r.value for r in await peer.get(keys.collab_model_key(run_id)) if isinstance(r.value, ModelRecord)]
    return max(found, key=lambda m: m.step) if found else None
