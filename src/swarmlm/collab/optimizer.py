"""CollaborativeOptimizer: many peers, one model — synchronous averaging or DiLoCo.

    opt = await CollaborativeOptimizer.create(peer, model, build_optimizer(model, cfg),
                                              CollabOptions(run_id="demo", micro_batch=8, target_batch=64))
    await opt.join()                       # downloads the state if the run is already going
    while opt.global_step < steps:
        x, y = batches.get(*opt.data_index)
        lm_loss(model, x, y).backward()
        await opt.step(n_samples=8, loss=...)

Synchronous mode: each `step()` adds one micro-batch of gradients. Once this peer has done
its share of the target global batch (progress.py decides from the DHT records), the peers
form a group (matchmaking.py) and all-reduce their mean gradients weighted by samples
(allreduce.py); every member then clips, sets the learning rate of the global step and
takes the same AdamW step — the same update a single process with the whole global batch
would take, and identical parameters on every peer.

DiLoCo mode (Douillard et al., 2023): each `step()` is a local AdamW step; every H of them
the peers average the pseudo-gradient (global parameters − local parameters) and take an
outer Nesterov SGD step from the global parameters, so they talk H times less.

A failed round is retried over the survivors (unresponsive peers are left out until their
progress record moves again); a peer that finds the swarm past its step, and a late joiner,
download model and optimizer state from the most advanced peer (state.py). Background work
(publishing progress, refreshing the swarm view) is one task owned by this object.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from swarmlm.collab import metrics
from swarmlm.collab import state as states
from swarmlm.collab.allreduce import TRANSPORTS, AllReduce, RoundResult
from swarmlm.collab.compression import CODECS
from swarmlm.collab.matchmaking import FellBehind, Matchmaker
from swarmlm.collab.progress import (
    RUNS_SERVICE,
    ProgressRecord,
    SwarmView,
    build_view,
    is_time_to_average,
    peer_to_follow,
    reference_peer,
    round_candidates,
)
from swarmlm.collab.robust import AGGREGATORS
from swarmlm.collab.witness import Cosigner, Witness
from swarmlm.errors import PeerError, RoundFailed, UserError
from swarmlm.log import get_logger
from swarmlm.p2p import keys
from swarmlm.p2p.directory import publish_entry

log = get_logger(__name__)


@dataclass(frozen=True)
class CollabOptions:
    run_id: str                       # peers with the same run ID train one model together
    micro_batch: int                  # samples one `step()` call adds (the local batch size)
    target_batch: int | None = None   # samples per global step over the swarm; None: one micro-batch per peer
    diloco_steps: int = 0             # H: local AdamW steps between averaging rounds; 0: synchronous
    outer_lr: float = 0.7             # DiLoCo outer Nesterov SGD learning rate (paper: 0.7)
    outer_momentum: float = 0.9       # ... and its momentum (paper: 0.9)
    compression: str = "none"         # what is averaged travels as: none | fp16 | int8
    aggregator: str = "mean"          # mean | trimmed-mean | centered-clip
    transport: str = "auto"           # averaging traffic: auto (the encrypted side channel between members
                                      # where reachable, else libp2p streams) | libp2p (libp2p streams only)
    grad_clip: float = 1.0            # gradient-norm clip (sync: of the averaged gradient); 0: off
    round_timeout_s: float = 30.0     # bound on one all-reduce
    gather_timeout_s: float = 3.0     # how long a leader waits for the peers it expects
    max_attempts: int = 4             # rounds tried for one step before step() gives up for now
    progress_ttl_s: float = 10.0      # a peer whose progress record is older than this is gone
    refresh_s: float = 0.5            # how often progress is published and the swarm view refreshed
    linger_s: float = 1.0             # close() keeps serving this long, so the last replies get out

    def validate(self) -> CollabOptions:
        if not self.run_id or "/" in self.run_id:
            raise UserError(f"run ID must be a non-empty name without '/', got {self.run_id!r}")
        if self.micro_batch <= 0 or (self.target_batch is not None and self.target_batch <= 0):
            raise UserError("micro batch and target batch must be positive")
        if self.diloco_steps < 0:
            raise UserError(f"--diloco H must not be negative, got {self.diloco_steps}")
        if self.compression not in CODECS:
            raise UserError(f"compression must be one of {', '.join(CODECS)}, got {self.compression!r}")
        if self.aggregator not in AGGREGATORS:
            raise UserError(f"aggregator must be one of {', '.join(AGGREGATORS)}, got {self.aggregator!r}")
        if self.transport not in TRANSPORTS:
            raise UserError(f"collab transport must be one of {', '.join(TRANSPORTS)}, got {self.transport!r}")
        if min(self.round_timeout_s, self.gather_timeout_s, self.refresh_s, self.progress_ttl_s) <= 0:
            raise UserError("timeouts and intervals must be positive")
        return self


def flat_grads(params: list[nn.Parameter]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])


def flat_params(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float() for p in params])


def unflatten_into(vector: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    out, offset = [], 0
    for p in like:
        out.append(vector[offset:offset + p.numel()].view_as(p).to(p.dtype))
        offset += p.numel()
    return out


class CollaborativeOptimizer:
    """Wraps a local optimizer; `step()` after each backward. Build with `await create(...)`."""

    def __init__(self, peer: Any, model: nn.Module, opt: torch.optim.Optimizer, options: CollabOptions, *,
                 lr_at: Callable[[int], float] | None, matchmaker: Matchmaker, reducer: AllReduce,
                 witness: Witness | None = None):
        self.peer, self.model, self.opt, self.options = peer, model, opt, options
        self.witness = witness            # co-signs each successful round's record (witness.py), if any
        self.lr_at = lr_at
        self.matchmaker, self.reducer = matchmaker, reducer
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.global_step = 0              # completed averaging rounds (sync: optimizer steps)
        self.local_step = 0               # DiLoCo: local AdamW steps; sync: equals global_step
        self.samples_seen = 0.0           # samples behind the global model, summed over the swarm
        self.micro = 0                    # micro-batches accumulated towards the current step
        self.samples = 0                  # samples accumulated (sync) / since the last round (DiLoCo)
        self.loss_ema = math.nan
        self.samples_per_s = 0.0          # this peer's compute throughput (EMA)
        self.lineage = ""                 # digest of the rounds behind the global model (see progress.py)
        self.rounds_failed = 0
        self.catch_ups = 0
        self.view = SwarmView({})
        self._records: list = []
        self._banned: dict[str, float] = {}      # peer -> time of its record when banned
        self._last_return = time.monotonic()
        self._refresher: asyncio.Task | None = None
        self._closed = False
        self._listed_at = -math.inf       # when this run was last listed in the DHT's directory (monotonic)
        if options.diloco_steps:
            self.outer_opt = torch.optim.SGD(self.params, lr=options.outer_lr, momentum=options.outer_momentum,
                                             nesterov=True)
            self.outer_params = [p.detach().clone() for p in self.params]
        else:
            self.outer_opt, self.outer_params = None, None

    @classmethod
    async def create(cls, peer: Any, model: nn.Module, opt: torch.optim.Optimizer, options: CollabOptions, *,
                     lr_at: Callable[[int], float] | None = None, cosigner: Cosigner | None = None
                     ) -> CollaborativeOptimizer:
        """`cosigner`: the ledger's signing (witness.py); with it, every successful round's record is
        co-signed by its members and submitted."""
        options.validate()
        mm = await Matchmaker.create(peer, options.run_id, gather_timeout_s=options.gather_timeout_s)
        reducer = await AllReduce.create(peer, aggregator=options.aggregator, compression=options.compression,
                                         transport=options.transport,
                                         wait_for_round_s=options.gather_timeout_s + options.round_timeout_s)
        witness = Witness(peer, options.run_id, cosigner) if cosigner is not None else None
        self = cls(peer, model, opt, options, lr_at=lr_at, matchmaker=mm, reducer=reducer, witness=witness)
        await states.serve_state(peer, self.snapshot)
        return self

    # ---- life cycle ------------------------------------------------------------------------------

    async def join(self, *, timeout_s: float = 60.0) -> bool:
        """Start publishing progress; download the state if peers of this run are already active."""
        await self._refresh()
        joined = False
        donor = reference_peer(SwarmView({p: r for p, r in self.view.peers.items() if p != self.peer.peer_id}))\
            if self.view.size > 1 else None
        if donor is not None:
            await self._catch_up(donor, timeout_s=timeout_s)
            joined = True
        self._refresher = asyncio.ensure_future(self._refresh_forever())
        return joined

    async def refresh(self) -> None:
        """Publish this peer's progress and re-read the swarm's now (it also happens every `refresh_s`)."""
        await self._refresh()

    async def close(self) -> None:
        """Say goodbye in the DHT, keep serving `linger_s` for replies still in flight, stop the refresher."""
        if self._closed:
            return
        self._closed = True
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
        if self.witness is not None:
            await self.witness.close()        # the last rounds' records need this peer in the DHT
        try:
            await self.peer.store(keys.collab_progress_key(self.options.run_id), self._record(active=False),
                                  ttl_s=self.options.progress_ttl_s, subkey=self.peer.peer_id)
        except PeerError as e:
            log.info("could not publish the final progress record: %s", e)
        await asyncio.sleep(self.options.linger_s)
        await self.reducer.close()

    @property
    def swarm_size(self) -> int:
        return self.view.size

    @property
    def data_index(self) -> tuple[int, int]:
        """(step, micro) of the next micro-batch: data windows are a pure function of these."""
        return (self.local_step, 0) if self.options.diloco_steps else (self.global_step, self.micro)

    # ---- stepping --------------------------------------------------------------------------------

    async def step(self, n_samples: int, loss: float = math.nan) -> bool:
        """Account one micro-batch whose gradients are in `.grad`; True when the global model moved."""
        now = time.monotonic()
        compute_s = max(now - self._last_return, 1e-6)
        rate = n_samples / compute_s
        self.samples_per_s = rate if self.samples_per_s == 0 else 0.8 * self.samples_per_s + 0.2 * rate
        if math.isfinite(loss):
            self.loss_ema = loss if not math.isfinite(self.loss_ema) else 0.9 * self.loss_ema + 0.1 * loss
        self.micro += 1
        self.samples += n_samples
        before = self.global_step
        try:
            if self.options.diloco_steps:
                await self._diloco_step()
            else:
                await self._sync_step()
        finally:
            self._last_return = time.monotonic()
        return self.global_step != before

    async def _follow_if_needed(self) -> bool:
        self._rebuild_view()
        ref = peer_to_follow(self.view, self.peer.peer_id)
        if ref is None:
            return False
        log.info("step %d: %s holds the reference model; downloading it", self.global_step, ref)
        await self._catch_up(ref)
        return True

    async def _sync_step(self) -> None:
        me = self.peer.peer_id
        if await self._follow_if_needed():
            return
        if not is_time_to_average(self.view, me, step=self.global_step, my_samples=self.samples,
                                  target=self.options.target_batch, micro_batch=self.options.micro_batch):
            return
        grads = flat_grads(self.params) / self.micro                      # (numel,) mean over this peer's samples
        result = await self._average(grads, weight=float(self.samples))
        if result is None:
            return
        with torch.no_grad():
            for p, g in zip(self.params, unflatten_into(result.vector, self.params)):
                p.grad = g.clone()
        self._local_update(self.global_step)
        await self._advance(result)

    def _local_update(self, step: int) -> None:
        """Clip the gradients in place, set the learning rate for `step`, take the inner
        optimizer's step and clear the gradients."""
        if self.options.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.options.grad_clip)
        if self.lr_at is not None:
            for group in self.opt.param_groups:
                group["lr"] = self.lr_at(step)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    async def _diloco_step(self) -> None:
        if await self._follow_if_needed():
            return
        self._local_update(self.local_step)
        self.local_step += 1
        if self.local_step % self.options.diloco_steps:
            return
        pseudo = flat_params(self.outer_params) - flat_params(self.params)   # (numel,) what H steps moved
        result = await self._average(pseudo, weight=float(self.samples))
        if result is None:
            return
        with torch.no_grad():
            for p, outer, g in zip(self.params, self.outer_params, unflatten_into(result.vector, self.params)):
                p.copy_(outer)
                p.grad = g.clone()
        self.outer_opt.step()
        self.outer_opt.zero_grad(set_to_none=True)
        for outer, p in zip(self.outer_params, self.params):
            outer.copy_(p.detach())
        await self._advance(result)

    async def _advance(self, result: RoundResult) -> None:
        self.lineage = hashlib.sha256(self.lineage.encode() + result.group.group_id).hexdigest()[:32]
        self.samples_seen += result.total_weight
        if self.witness is not None:
            self.witness.round_done(result.group, result.seen, float(self.samples))
        self.global_step += 1
        if not self.options.diloco_steps:
            self.local_step = self.global_step
        self.micro = self.samples = 0
        await self.matchmaker.set_step(self.global_step, self.lineage)

    async def _average(self, vector: torch.Tensor, *, weight: float) -> RoundResult | None:
        """One successful round for the current step, or None after catching up / giving up for now."""
        me, step = self.peer.peer_id, self.global_step
        for attempt in range(self.options.max_attempts):
            candidates = round_candidates(self.view, me, step)
            try:
                group, suspects = await self.matchmaker.form_group(
                    step, candidates, timeout_s=self.options.gather_timeout_s * 3 + 5.0)
                self._ban(suspects)
                started = time.monotonic()
                result = await self.reducer.run(group, vector, weight=weight, timeout_s=self.options.round_timeout_s)
                metrics.ROUND_SECONDS.observe(time.monotonic() - started)
                if result.dropped:
                    log.warning("step %d: dropped %d malformed part updates", step, len(result.dropped))
                return result
            except FellBehind as e:
                log.info("step %d: %s; downloading the state", step, e)
                await self._catch_up(e.ahead)
                return None
            except RoundFailed as e:
                self.rounds_failed += 1
                self._ban(getattr(e, "suspects", ()))
                await self.matchmaker.abandon(step)
                log.warning("step %d attempt %d: %s", step, attempt + 1, e)
                await self._refresh()
                ahead = peer_to_follow(self.view, me)
                if ahead is not None:
                    await self._catch_up(ahead)
                    return None
        log.warning("step %d: no round after %d attempts; accumulating more", step, self.options.max_attempts)
        return None

    # ---- state for late joiners ------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The global model and optimizer state, taken between steps (no await inside)."""
        named = [n for n, p in self.model.named_parameters() if p.requires_grad]
        source = self.outer_params if self.options.diloco_steps else self.params
        return {"step": self.global_step, "samples_seen": self.samples_seen, "lineage": self.lineage,
                "params": {n: t.detach().clone() for n, t in zip(named, source)},
                "inner": states.optimizer_state(self.opt),
                "outer": states.optimizer_state(self.outer_opt) if self.outer_opt is not None else {}}

    async def _catch_up(self, donor: str | None, *, timeout_s: float = 60.0) -> None:
        candidates = [donor] if donor else []
        candidates += [p for p, _ in sorted(self.view.peers.items(), key=lambda kv: -kv[1].step)
                       if p not in candidates and p != self.peer.peer_id]
        for peer_id in candidates:
            try:
                snap = await states.download_state(self.peer, peer_id, timeout_s=timeout_s)
                self._load(snap)
                log.info("downloaded the state of step %d from %s", self.global_step, peer_id)
                self.catch_ups += 1
                await self.matchmaker.set_step(self.global_step, self.lineage)
                await self._refresh()              # tell the swarm at once where this peer now is
                return
            except (PeerError, ValueError) as e:
                log.warning("state download from %s failed: %s", peer_id, e)
        log.warning("no peer could send the state; going on from here")

    def _load(self, snap: dict[str, Any]) -> None:
        params = snap.get("params")
        states.load_params(self.model, {n: params[n] for n in params} if isinstance(params, dict) else None)
        states.load_optimizer_state(self.opt, snap.get("inner", {}))
        if self.outer_opt is not None:
            states.load_optimizer_state(self.outer_opt, snap.get("outer", {}))
            for outer, p in zip(self.outer_params, self.params):
                outer.copy_(p.detach())
        self.global_step = int(snap["step"])
        self.lineage = snap["lineage"] if isinstance(snap.get("lineage"), str) else ""
        self.local_step = self.global_step * (self.options.diloco_steps or 1)
        seen = snap.get("samples_seen", 0.0)
        self.samples_seen = float(seen) if isinstance(seen, (int, float)) else 0.0
        self.micro = self.samples = 0
        self.opt.zero_grad(set_to_none=True)

    # ---- progress in the DHT ---------------------------------------------------------------------

    def _record(self, *, active: bool = True) -> ProgressRecord:
        return ProgressRecord(step=self.global_step, samples=self.samples, samples_per_s=self.samples_per_s,
                              loss=self.loss_ema, time=time.time(), active=active, lineage=self.lineage)

    def _ban(self, peers: Any) -> None:
        latest = {r.signer: r.value.time for r in self._records if isinstance(r.value, ProgressRecord)}
        for p in peers:
            if p != self.peer.peer_id:
                self._banned[p] = latest.get(p, time.time())

    def _rebuild_view(self) -> None:
        times = {r.signer: r.value.time for r in self._records if isinstance(r.value, ProgressRecord)}
        banned = {p for p, t in self._banned.items() if times.get(p, 0.0) <= t}
        for p in set(self._banned) - banned:
            del self._banned[p]                 # its record moved on since: it is back
        self.view = build_view(self._records, me=self.peer.peer_id, mine=self._record(), now=time.time(),
                               max_age_s=self.options.progress_ttl_s, banned=banned)

    async def _refresh(self) -> None:
        key = keys.collab_progress_key(self.options.run_id)
        try:
            await self.peer.store(key, self._record(), ttl_s=self.options.progress_ttl_s, subkey=self.peer.peer_id)
            self._records = await self.peer.get(key, latest=True)
            if time.monotonic() - self._listed_at > self.options.progress_ttl_s:
                # the run in the swarm's directory (p2p/directory.py), where the dashboard finds it
                await publish_entry(self.peer, RUNS_SERVICE, self.options.run_id, ttl_s=3 * self.options.progress_ttl_s)
                self._listed_at = time.monotonic()
        except PeerError as e:
            log.info("progress refresh failed: %s", e)
        self._rebuild_view()

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.options.refresh_s)
            await self._refresh()
