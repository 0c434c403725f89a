"""`Coordinator`: runs the rounds of a federated run over the swarm (`swarmlm fl coordinate`).

Each round: publish the global model into this peer's block store (clients fetch it by its
manifest CID, verified block by block) and announce the round in the DHT; sample clients among
those connected; send them the round; collect their updates (plain) or drive the secure
aggregation stages (secagg/server.py) with a deadline per stage; divide the sum and step the
model. A client whose connection ends, or that misses a deadline, has dropped; a round left
with fewer than `min_clients` fails with a clear line and is retried (a new attempt, new keys,
a new sample) once enough clients are connected again. Every completed round appends one
line to `rounds.jsonl`. Knows nothing of how a client trains.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from swarmlm.errors import PeerError, RoundFailed, SwarmlmError, WireError
from swarmlm.log import get_logger
from swarmlm.model.lora import merge_lora
from swarmlm.p2p import keys
from swarmlm.p2p.records import record_type
from swarmlm.privacy import dp, federated, metrics, wire
from swarmlm.privacy.federated import FlConfig
from swarmlm.privacy.secagg.server import SecAggConfig, SecAggServer
from swarmlm.privacy.secagg.stages import TERMINAL

log = get_logger(__name__)

JOIN_TIMEOUT_S = 10.0
ANNOUNCE_TTL_S = 600.0
RUNS_SERVICE = "fl.runs"      # the directory (p2p/directory.py) where coordinators list their run (size: its rounds)


@record_type("privacy.fl")
@dataclass(frozen=True)
class RunRecord:
    """The coordinator of a federated run and its current global model; since its first completed round, also
    that round's outcome (what the dashboard shows: clients, dropped, losses, ε where DP is on)."""
    round: int
    manifest_cid: str
    secure: bool
    rounds: int = 0               # rounds the run will do
    done: int = 0                 # rounds completed
    clients: int = 0              # of the last completed round: clients whose update counted ...
    dropped: int = 0              # ... and sampled clients that dropped out
    train_loss: float = 0.0       # its mean losses (has_loss: there were reports)
    val_loss: float = 0.0
    has_loss: bool = False
    epsilon: float = -1.0         # the DP guarantee so far (ε at `delta`); negative: DP is off
    delta: float = 0.0
    sample_epsilon: float = -1.0  # sample-level DP-SGD in the clients: the largest ε a client reported; negative: off

    def check(self) -> None:
        if not (0 <= self.round and 0 <= self.done and 0 <= self.rounds and 0 <= self.clients and 0 <= self.dropped):
            raise ValueError("rounds and counts must not be negative")
        if not all(math.isfinite(x) for x in (self.train_loss, self.val_loss, self.epsilon, self.delta,
                                              self.sample_epsilon)):
            raise ValueError("losses and the DP guarantee must be finite")


@dataclass
class _Member:
    conn: Any
    joined_at: float


@dataclass
class RoundResult:
    round: int
    attempt: int
    sampled: list[str]
    survivors: list[str]
    train_loss: float
    val_loss: float
    seconds: float
    extra: dict = field(default_factory=dict)


class Coordinator:
    def __init__(self, peer: Any, store: Any, node: Any, cfg: FlConfig, *, run_id: str, model: Any, model_cfg: Any,
                 tokenizer: Any, out: Path, printer: Any = print):
        self.peer, self.store, self.node, self.cfg, self.run_id = peer, store, node, cfg, run_id
        self.model, self.model_cfg, self.tokenizer, self.out = model, model_cfg, tokenizer, Path(out)
        self.print = printer
        self.members: dict[str, _Member] = {}
        self.inbox: asyncio.Queue = asyncio.Queue()        # (peer_id, message | None when it left)
        self.member_event = asyncio.Event()
        self.params = federated.flatten(model)             # this round's trainable coordinates (d,)
        self.rounds_done = 0
        self.last: dict | None = None                      # the last completed round's record (rounds.jsonl's)
        self.max_rate = 0.0          # the largest sampling rate of the completed rounds: what is accounted
        self.sample_dp: dict[str, dict] = {}     # DP-SGD: each client's last reported rate, steps and ε
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        side = await self.peer.side_channel()
        await side.serve(wire.PURPOSE, self._serve, max_record_bytes=wire.MAX_RECORD_BYTES)

    # ---- members -------------------------------------------------------------------------------

    async def _serve(self, conn: Any) -> None:
        """One client's connection for the whole run: its JOIN, then everything it sends, into the inbox."""
        pid = conn.peer_id
        try:
            data = await asyncio.wait_for(conn.read_record(), JOIN_TIMEOUT_S)
            metrics.FL_RECEIVED.inc(len(data))
            first = wire.decode(data)
            if not isinstance(first, wire.Join) or first.run_id != self.run_id:
                raise WireError(f"expected a JOIN for run {self.run_id!r}")
            if pid in self.members:
                raise WireError(f"{pid} has already joined this run")
        except (SwarmlmError, asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError) as e:
            log.info("refusing %s: %s", pid, e)
            with contextlib.suppress(Exception):
                conn.write(wire.encode(wire.Error(str(e) or "no JOIN in time")))
                await conn.drain()
            conn.close()
            return
        self.members[pid] = _Member(conn, time.time())
        metrics.FL_CLIENTS.set(len(self.members))
        self.member_event.set()
        self.print(f"fl: client {pid[-8:]} joined ({len(self.members)} connected)")
        try:
            welcome = wire.encode(wire.Welcome(self.run_id, len(self.members)))
            conn.write(welcome)
            metrics.FL_SENT.inc(len(welcome))
            await conn.drain()
            while True:
                data = await conn.read_record()
                metrics.FL_RECEIVED.inc(len(data))
                try:
                    msg = wire.decode(data)
                except WireError as e:
                    log.warning("a bad record from %s: %s", pid, e)
                    conn.write(wire.encode(wire.Error(f"bad record: {e}")))
                    continue
                self.inbox.put_nowait((pid, msg))
        except (asyncio.IncompleteReadError, ConnectionError, PeerError, OSError) as e:
            log.info("client %s left: %s", pid, e)
        finally:
            if self.members.get(pid) is not None and self.members[pid].conn is conn:
                del self.members[pid]
                metrics.FL_CLIENTS.set(len(self.members))
            self.inbox.put_nowait((pid, None))
            conn.close()

    async def wait_for_members(self, n: int, *, timeout_s: float | None = None) -> None:
        last = -1
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while len(self.members) < n:
            if len(self.members) != last:
                last = len(self.members)
                self.print(f"fl: waiting for clients: {last}/{n} joined")
            self.member_event.clear()
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise RoundFailed(f"only {len(self.members)} of the {n} clients needed are connected")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.member_event.wait(), left)

    async def _send(self, pid: str, msg: object) -> bool:
        member = self.members.get(pid)
        if member is None:
            return False
        try:
            data = wire.encode(msg)
            member.conn.write(data)
            await member.conn.drain()
            metrics.FL_SENT.inc(len(data))
            return True
        except (ConnectionError, PeerError, OSError) as e:
            log.info("sending to %s failed: %s", pid, e)
            return False

    # ---- the run -------------------------------------------------------------------------------

    async def run(self, *, start_clients: int = 0) -> Path:
        """All the rounds; the first once `max(min_clients, start_clients)` clients are connected."""
        self.out.mkdir(parents=True, exist_ok=True)
        rounds_path = self.out / "rounds.jsonl"
        rounds_path.write_text("")
        await self.wait_for_members(max(self.cfg.min_clients, start_clients))
        for r in range(self.cfg.rounds):
            result = await self._round_with_retries(r)
            record = self._record(result)
            with rounds_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            self.last = record
            metrics.round_done(record)
            await self.announce(r, record["manifest_cid"])
            eps = f", eps {record['epsilon']:.3f}" if "epsilon" in record else ""
            if "sample_dp" in record:
                eps += f", sample eps {record['sample_dp']['epsilon']:.3f}"
            self.print(f"fl: round {r + 1}/{self.cfg.rounds}: {len(result.survivors)} clients, "
                       f"{len(result.sampled) - len(result.survivors)} dropped, train loss {result.train_loss:.4f}, "
                       f"val loss {result.val_loss:.4f}{eps} ({result.seconds:.1f} s)")
        final = self._save(self.out)
        for pid in list(self.members):
            await self._send(pid, wire.End("the run is complete"))
        return final

    async def _round_with_retries(self, r: int) -> RoundResult:
        failures: list[str] = []
        for attempt in range(self.cfg.max_attempts):
            await self.wait_for_members(self.cfg.min_clients)
            try:
                result = await self._round(r, attempt)
                result.extra["failed_attempts"] = failures
                return result
            except RoundFailed as e:
                metrics.FL_ROUND_FAILURES.inc()
                failures.append(str(e))
                self.print(f"fl: round {r + 1} attempt {attempt + 1} failed: {e}; retrying")
        raise RoundFailed(f"round {r + 1} failed {self.cfg.max_attempts} times; giving up")

    def _record(self, res: RoundResult) -> dict:
        rec = {"round": res.round, "attempt": res.attempt, "clients": len(res.survivors),
               "dropped": len(res.sampled) - len(res.survivors), "sampled": len(res.sampled),
               "train_loss": res.train_loss, "val_loss": res.val_loss, "secure": self.cfg.secure,
               "seconds": res.seconds, **res.extra}
        if self.cfg.dp is not None:
            # every completed round is accounted at the largest rate any of them had (ε grows with q),
            # so a swarm whose size changed is never under-counted
            rec.update(dp.event_record(self.cfg.dp, self.max_rate, self.rounds_done))
            rec["round_sampling_rate"] = res.extra["sampling_rate"]
        if self.cfg.dp_sgd_clip > 0:
            eps = [c["epsilon"] for c in self.sample_dp.values()]
            rec["sample_dp"] = {"sampling": "poisson", "noise_multiplier": self.cfg.dp_sgd_noise,
                                "clip": self.cfg.dp_sgd_clip, "delta": self.cfg.dp_delta, "accountant": "rdp",
                                "epsilon": max(eps) if eps else 0.0, "clients": dict(sorted(self.sample_dp.items()))}
        return rec

    def _account_samples(self, reports: dict[str, wire.Report], survivors: list[str]) -> None:
        """Each client's sample-level ε as it reported it (it trained, whether or not its update was
        summed); a survivor that reported none, or nonsense, counts as unaccounted (ε = inf)."""
        for pid in sorted(set(reports) | set(survivors)):
            rep = reports.get(pid)
            ok = (rep is not None and 0 < rep.dp_sgd_rate <= 1 and rep.dp_sgd_steps > 0
                  and rep.dp_sgd_epsilon >= 0)                               # NaN fails too
            if not ok:
                log.warning("client %s reported no valid DP-SGD accounting", pid)
            self.sample_dp[pid] = ({"sampling_rate": rep.dp_sgd_rate, "steps": rep.dp_sgd_steps,
                                    "epsilon": rep.dp_sgd_epsilon} if ok else
                                   {"sampling_rate": None, "steps": None, "epsilon": float("inf")})

    async def _round(self, r: int, attempt: int) -> RoundResult:
        t0 = time.perf_counter()
        joined = sorted(self.members)
        chosen = federated.choose_clients(joined, self.cfg, round=r, attempt=attempt)
        if len(chosen) < self.cfg.min_clients:
            raise RoundFailed(f"{len(chosen)} clients sampled, fewer than --min-clients {self.cfg.min_clients}")
        cid = await self.publish(r)
        lora_seed = federated.lora_seed(self.cfg, r, attempt)
        if self.cfg.lora_rank:                  # the round's frozen A matrices, as every client draws them
            federated.attach_lora(self.model, self.cfg.lora_rank, self.cfg.lora_alpha, lora_seed)
        try:
            self.params = federated.flatten(self.model)   # the whole model, or the adapters' B (zeros)
            start = wire.RoundStart(
                round=r, attempt=attempt, manifest_cid=cid, length=int(self.params.size),
                local_steps=self.cfg.local_steps, lr=self.cfg.lr, fedprox_mu=self.cfg.fedprox_mu,
                batch_size=self.cfg.batch_size, seq_len=self.cfg.seq_len, secure=self.cfg.secure,
                coord_clip=self.cfg.coord_clip, dp_clip=self.cfg.dp_clip, dp_noise=self.cfg.dp_noise,
                min_clients=self.cfg.min_clients, max_clients=len(chosen), lora_rank=self.cfg.lora_rank,
                lora_alpha=self.cfg.lora_alpha, lora_seed=lora_seed, dp_sgd_clip=self.cfg.dp_sgd_clip,
                dp_sgd_noise=self.cfg.dp_sgd_noise, dp_delta=self.cfg.dp_delta)
            self._drain_stale()
            sent = [pid for pid in chosen if await self._send(pid, start)]
            reports: dict[str, wire.Report] = {}
            stage_s: dict = {}
            if self.cfg.secure:
                total, survivors = await self._secure_sum(r, attempt, sent, reports, stage_s)
            else:
                total, survivors = await self._plain_sum(r, attempt, sent, reports)
            denom = federated.denominator(self.cfg, len(survivors), len(joined))
            self.params = federated.apply_sum(self.params, total, denom)
            federated.load_flat(self.model, self.params)
        finally:
            if self.cfg.lora_rank:              # fold B A into the weights (nothing if the round failed: B = 0)
                merge_lora(self.model)
        self.rounds_done += 1
        if self.cfg.dp_sgd_clip > 0:
            self._account_samples(reports, survivors)
        self.max_rate = max(self.max_rate, federated.sampling_rate(self.cfg, len(joined)))
        got = [reports[p] for p in survivors if p in reports]
        weights = np.array([max(rep.n_samples, 1) for rep in got], dtype=np.float64)
        mean = (lambda xs: float(np.average(xs, weights=weights))) if got else (lambda xs: float("nan"))
        extra = {"sampling_rate": federated.sampling_rate(self.cfg, len(joined)), "joined": len(joined),
                 "manifest_cid": cid, **({"stage_s": stage_s} if stage_s else {})}
        return RoundResult(r, attempt, chosen, survivors, mean([g.train_loss for g in got]),
                           mean([g.val_loss for g in got]), time.perf_counter() - t0, extra)

    def _drain_stale(self) -> None:
        while not self.inbox.empty():
            self.inbox.get_nowait()

    async def _next(self, deadline: float) -> tuple[str, object | None] | None:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        try:
            return await asyncio.wait_for(self.inbox.get(), left)
        except asyncio.TimeoutError:
            return None

    async def _plain_sum(self, r: int, attempt: int, sent: list[str], reports: dict) -> tuple[np.ndarray, list[str]]:
        d = self.params.size
        updates: dict[str, np.ndarray] = {}
        waiting = set(sent)
        deadline = time.monotonic() + self.cfg.round_timeout_s
        while waiting:
            item = await self._next(deadline)
            if item is None:
                break
            pid, msg = item
            if msg is None:
                waiting.discard(pid)
            elif pid in waiting and isinstance(msg, wire.Report) and (msg.round, msg.attempt) == (r, attempt):
                reports[pid] = msg
            elif pid in waiting and isinstance(msg, wire.Update) and (msg.round, msg.attempt) == (r, attempt):
                try:
                    updates[pid] = check_plain_update(msg.vector, d, self.cfg.coord_clip)
                except WireError as e:
                    await self._send(pid, wire.Error(str(e)))
                    log.warning("update from %s refused: %s", pid, e)
                waiting.discard(pid)
        survivors = sorted(updates)
        if len(survivors) < self.cfg.min_clients:
            raise RoundFailed(f"{len(survivors)} of {len(sent)} clients sent updates, fewer than --min-clients "
                              f"{self.cfg.min_clients}")
        total = np.zeros(d, dtype=np.float64)
        for pid in survivors:                  # in a fixed order: the same sum every run
            np.add(total, updates[pid], out=total)
        return total, survivors

    async def _secure_sum(self, r: int, attempt: int, sent: list[str], reports: dict,
                          stage_s: dict | None = None) -> tuple[np.ndarray, list[str]]:
        server = SecAggServer(self.peer.identity, run_id=f"{self.run_id}/{attempt}", round=r,
                              config=SecAggConfig(clip=self.cfg.coord_clip, max_clients=max(len(sent), 1),
                                                  min_clients=self.cfg.min_clients, graph_seed=self.cfg.seed + r),
                              length=int(self.params.size), expected=sent)
        alive = set(sent)
        while server.stage not in TERMINAL:
            t0 = time.perf_counter()
            stage = server.stage.value
            deadline = time.monotonic() + self.cfg.round_timeout_s
            while server.waiting_for() & alive:
                item = await self._next(deadline)
                if item is None:
                    break
                pid, msg = item
                if msg is None:
                    alive.discard(pid)
                elif isinstance(msg, wire.Report) and (msg.round, msg.attempt) == (r, attempt):
                    reports[pid] = msg
                elif isinstance(msg, wire.SecAgg) and (msg.round, msg.attempt) == (r, attempt):
                    try:
                        server.receive(msg.data)
                    except (SwarmlmError, ValueError) as e:
                        log.warning("secure aggregation message from %s refused: %s", pid, e)
                        await self._send(pid, wire.Error(f"refused: {e}"))
            t1 = time.perf_counter()
            out = server.advance()                           # RoundFailed below the minimum
            for pid, data in out.items():
                if pid in alive and not await self._send(pid, wire.SecAgg(r, attempt, data)):
                    alive.discard(pid)
            if stage_s is not None:                          # waiting for the clients, then closing the stage
                stage_s[stage] = [round(t1 - t0, 4), round(time.perf_counter() - t1, 4)]
        return server.result, list(server.survivors)

    # ---- the model -----------------------------------------------------------------------------

    def _save(self, directory: Path) -> Path:
        from swarmlm.model.hf import save_model
        save_model(self.model, self.model_cfg, directory, tokenizer=self.tokenizer)
        return directory

    async def publish(self, r: int) -> str:
        from swarmlm.store.manifest import publish_model
        with tempfile.TemporaryDirectory(prefix="swarmlm-fl-") as tmp:
            self._save(Path(tmp))
            cid = str(await asyncio.to_thread(publish_model, self.store, tmp, name=f"{self.run_id}-round{r}"))
        await self.node.announce_all()
        await self.announce(r, cid)
        return cid

    def run_record(self, r: int, cid: str) -> RunRecord:
        """What the DHT says of the run now: round `r`'s model, the last completed round's outcome."""
        last = self.last or {}
        finite = lambda x: isinstance(x, float) and math.isfinite(x)          # noqa: E731
        has_loss = finite(last.get("train_loss")) and finite(last.get("val_loss"))
        eps = last.get("epsilon")
        sample_eps = (last.get("sample_dp") or {}).get("epsilon")
        return RunRecord(r, cid, self.cfg.secure, rounds=self.cfg.rounds, done=self.rounds_done,
                         clients=last.get("clients", 0), dropped=last.get("dropped", 0),
                         train_loss=last["train_loss"] if has_loss else 0.0,
                         val_loss=last["val_loss"] if has_loss else 0.0, has_loss=has_loss,
                         epsilon=float(eps) if eps is not None and math.isfinite(eps) else -1.0,
                         delta=float(last.get("delta", 0.0)),
                         sample_epsilon=float(sample_eps) if sample_eps is not None and math.isfinite(sample_eps)
                         else -1.0)

    async def announce(self, r: int, cid: str) -> None:
        """The run's record under its key, and its entry in the swarm's directory (for the dashboard)."""
        from swarmlm.p2p.directory import publish_entry

        await self.peer.store(keys.fl_run_key(self.run_id), self.run_record(r, cid),
                              ttl_s=ANNOUNCE_TTL_S, subkey=keys.peer_subkey(self.peer.peer_id))
        try:
            await publish_entry(self.peer, RUNS_SERVICE, self.run_id, ttl_s=ANNOUNCE_TTL_S, size=self.cfg.rounds)
        except ValueError as e:                 # a run ID the directory cannot name: the run goes on unlisted
            log.info("not listing run %r in the directory: %s", self.run_id, e)


def check_plain_update(data: bytes, length: int, clip: float) -> np.ndarray:
    """A plain update: exactly `length` finite float32 coordinates within [-clip, clip]; else `WireError`."""
    if len(data) != 4 * length:
        raise WireError(f"an update of {len(data) // 4} coordinates; this model has {length}")
    v = np.frombuffer(data, dtype="<f4")
    largest = max(float(v.max(initial=0)), -float(v.min(initial=0)))     # NaN propagates and fails the test
    if not largest <= clip * (1 + 1e-6):
        raise WireError(f"an update with coordinates outside [-{clip}, {clip}] or not finite")
    return v
