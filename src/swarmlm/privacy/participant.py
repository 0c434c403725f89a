"""`Participant`: one client of a federated run (`swarmlm fl join`); its data never leaves it.

It finds the run's coordinator in the DHT, joins over the side channel and keeps that
connection for the run. Per round: fetch the global model by its manifest CID (verified by the
store), evaluate it on the local validation split, train E local steps, clip and add its DP
noise share, and send the update: in the clear to the coordinator (plain rounds) or as a
SecAgg client (secagg/client.py), answering each stage the coordinator opens. When the round
asks for DP-SGD, local training clips and noises each step's per-example gradients over
Poisson-sampled local examples, and the report carries this client's sample-level ε so far
(public metadata); a client that cannot honour the settings leaves the run with one line. A round's local
batches come from (the run's seed, this client's seed, the round), so two runs with the same
seeds train the same way; the randomness DP rests on (noise, DP-SGD's sampling) is derived from
this peer's private key too, so a known `--seed` does not give it away. Knows nothing of other
clients.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from swarmlm.errors import PeerError, RemoteError, SwarmlmError, UserError, WireError
from swarmlm.log import get_logger
from swarmlm.p2p import keys
from swarmlm.privacy import dp, federated, metrics, wire
from swarmlm.privacy.coordinator import RunRecord
from swarmlm.privacy.secagg.client import SecAggClient

log = get_logger(__name__)

FIND_TIMEOUT_S = 120.0
EVAL_WINDOWS = 16


async def find_coordinator(peer: Any, run_id: str, *, timeout_s: float = FIND_TIMEOUT_S) -> str:
    """The peer ID of the coordinator announcing `run_id` (waits for one, polling the DHT)."""
    deadline = time.monotonic() + timeout_s
    delay = 0.2
    while True:
        found = [r for r in await peer.get(keys.fl_run_key(run_id)) if isinstance(r.value, RunRecord)]
        if found:
            return max(found, key=lambda r: r.value.round).signer
        if time.monotonic() > deadline:
            raise UserError(f"no coordinator announces federated run {run_id!r} (waited {timeout_s:.0f} s)")
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 2.0)


class Participant:
    def __init__(self, peer: Any, *, run_id: str, data: str, data_dir: str | None, seed: int | None,
                 printer: Callable[[str], None] = print, stop_in: Callable[[str], None] | None = None):
        self.peer, self.run_id, self.data, self.data_dir = peer, run_id, data, data_dir
        self.seed = seed
        self.print = printer
        self.stop_in = stop_in or (lambda stage: None)      # a test hook: called as each stage begins
        self.tokens = None
        self.model_dir = Path()                              # run(): a temporary folder for the fetched model
        self.current_cid: str | None = None
        self.rounds = 0
        self.bytes_sent = 0                                  # every record this client wrote, in plaintext bytes
        self.dp_sgd_event: tuple[float, float] | None = None  # DP-SGD's (Poisson rate, σ) in this run
        self.dp_sgd_steps = 0                                # DP-SGD steps taken so far: what is accounted

    def _secret_seed(self, start: wire.RoundStart, what: str) -> list[int] | None:
        """The seed of randomness the privacy guarantee rests on (the DP noise, DP-SGD's sampling):
        with `--seed`, derived from this peer's signature (Ed25519 signs deterministically) over the
        run, seed, round and purpose, so a rerun with the same identity repeats it while nobody
        without this peer's private key can predict it (a public seed must not give the noise
        away); without `--seed`, fresh entropy."""
        if self.seed is None:
            return None
        label = f"swarmlm/fl/secret-seed/1|{self.run_id}|{self.seed}|{start.round}|{start.attempt}|{what}"
        digest = hashlib.sha256(self.peer.identity.sign(label.encode())).digest()
        return [int.from_bytes(digest[i:i + 8], "little") for i in range(0, 32, 8)]

    async def run(self) -> int:
        self.model_dir = Path(tempfile.mkdtemp(prefix="swarmlm-fl-client-"))
        try:
            return await self._run()
        finally:
            shutil.rmtree(self.model_dir, ignore_errors=True)      # the fetched model: a copy of the store's

    async def _run(self) -> int:
        coordinator = await find_coordinator(self.peer, self.run_id)
        side = await self.peer.side_channel()
        conn = await side.open(coordinator, wire.PURPOSE, timeout_s=30.0, max_record_bytes=wire.MAX_RECORD_BYTES)
        try:
            await self._send(conn, wire.Join(self.run_id))
            welcome = wire.decode(await self._read(conn))
            if isinstance(welcome, wire.Error):
                raise RemoteError(f"the coordinator refused to let this client join: {welcome.message}")
            if not isinstance(welcome, wire.Welcome):
                raise WireError("the coordinator did not answer JOIN with WELCOME")
            self.print(f"fl: joined run {self.run_id} ({welcome.members} clients connected)")
            return await self._serve(conn, coordinator)
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            raise PeerError(f"the coordinator {coordinator} of run {self.run_id!r} went away after "
                            f"{self.rounds} rounds ({type(e).__name__})") from None
        finally:
            conn.close()

    async def _serve(self, conn: Any, coordinator: str) -> int:
        pending: object | None = None
        while True:
            msg = pending if pending is not None else wire.decode(await self._read(conn))
            pending = None
            if isinstance(msg, wire.End):
                self.print(f"fl: run over after {self.rounds} rounds: {msg.reason}")
                return 0
            if isinstance(msg, wire.Error):
                log.warning("the coordinator says: %s", msg.message)
                continue
            if not isinstance(msg, wire.RoundStart):
                continue                                     # a stage message of an abandoned attempt
            rounds, t0 = self.rounds, time.perf_counter()
            pending = await self._round(conn, coordinator, msg)
            if self.rounds > rounds:
                metrics.FL_CLIENT_ROUNDS.inc(self.rounds - rounds)
                metrics.FL_CLIENT_ROUND_SECONDS.observe(time.perf_counter() - t0)

    async def _round(self, conn: Any, coordinator: str, start: wire.RoundStart) -> object | None:
        """Train and contribute to one round; returns a message that arrived for a later round, if any."""
        self.stop_in("train")
        if not start.secure:
            vector, report = await self._contribution(start)
            await self._send(conn, report)
            self.stop_in("update")
            await self._send(conn, wire.Update(start.round, start.attempt, memoryview(vector.astype("<f4")).cast("B")))
            self._done(start, report)
            return None
        # secure: keys, shares and masks need no update, so they go on while the model trains
        client = SecAggClient(self.peer.identity, run_id=f"{self.run_id}/{start.attempt}", round=start.round,
                              coordinator=coordinator, length=start.length)
        self.stop_in("setup")
        await self._send(conn, wire.SecAgg(start.round, start.attempt, client.advertise()))
        training = asyncio.ensure_future(self._contribution(start))
        work: list[asyncio.Future] = [training]
        try:
            return await self._secure_stages(conn, start, client, training, work)
        finally:
            pending = [w for w in work if not w.done()]
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)    # a thread cannot be cancelled

    async def _secure_stages(self, conn: Any, start: wire.RoundStart, client: SecAggClient,
                             training: asyncio.Future, work: list[asyncio.Future]) -> object | None:
        expanding: asyncio.Future | None = None
        for stage in ("share_keys", "collect_masked", "unmask"):
            msg = wire.decode(await self._read(conn))
            while isinstance(msg, wire.Error):
                log.warning("the coordinator says: %s", msg.message)
                msg = wire.decode(await self._read(conn))
            if not isinstance(msg, wire.SecAgg) or (msg.round, msg.attempt) != (start.round, start.attempt):
                return msg                                   # the coordinator moved on without us
            try:
                if stage == "share_keys":
                    self.stop_in(stage)
                    out = client.share_keys(msg.data)
                elif stage == "collect_masked":
                    await expanding                                       # the masks, expanded meanwhile
                    await asyncio.to_thread(client.prepare_mask, msg.data)   # beside the training thread
                    vector, report = await training
                    await self._send(conn, report)
                    self.stop_in(stage)
                    out = client.mask_input(vector)
                else:
                    self.stop_in(stage)
                    out = client.unmask(msg.data)
            except UserError:
                raise                                        # a round this client refuses to train
            except (SwarmlmError, ValueError) as e:
                self.print(f"fl: leaving round {start.round + 1}: {e}")
                return None
            await self._send(conn, wire.SecAgg(start.round, start.attempt, out))
            if stage == "share_keys":         # the roster names the neighbours: expand every mask now, in a
                expanding = asyncio.ensure_future(asyncio.to_thread(client.expand_masks))   # thread, during
                work.append(expanding)        # the stage's round trip (and training)
            if stage == "collect_masked":
                self._done(start, report)
        return None

    def _done(self, start: wire.RoundStart, report: wire.Report) -> None:
        self.rounds += 1
        self.print(f"fl: round {start.round + 1}: trained {start.local_steps} steps, loss {report.train_loss:.4f}, "
                   f"validation loss {report.val_loss:.4f}; {self.bytes_sent} bytes sent so far"
                   + (" (secure aggregation)" if start.secure else ""))

    async def _contribution(self, start: wire.RoundStart) -> tuple[np.ndarray, wire.Report]:
        """Fetch the global model, train, clip and noise: (what goes into the sum, the round's report)."""
        model = await self._global_model(start.manifest_cid)
        if start.lora_rank:
            federated.attach_lora(model, start.lora_rank, start.lora_alpha, start.lora_seed)
        size = sum(p.numel() for _, p in federated.trainable(model))
        if size != start.length:
            raise WireError(f"the round aggregates {start.length} coordinates, this model has {size}")
        update, train_loss, val_loss = await asyncio.to_thread(self._train, model, start)
        metrics.FL_CLIENT_LOSS.set(train_loss)
        rng = np.random.default_rng(self._secret_seed(start, "noise share"))
        vector = federated.prepare_update(update, start.coord_clip, dp_clip=start.dp_clip, dp_noise=start.dp_noise,
                                          min_clients=start.min_clients, rng=rng)
        report = wire.Report(start.round, start.attempt, train_loss, val_loss, start.local_steps * start.batch_size)
        if start.dp_sgd_clip != 0 or start.dp_sgd_noise != 0:         # (checked by _train_dp_sgd)
            rate, sigma = self.dp_sgd_event
            eps = dp.epsilon(rate, sigma, self.dp_sgd_steps, start.dp_delta)
            report = dataclasses.replace(report, dp_sgd_rate=rate, dp_sgd_steps=self.dp_sgd_steps, dp_sgd_epsilon=eps)
        return vector, report

    async def _read(self, conn: Any) -> bytes:
        data = await conn.read_record()
        metrics.FL_CLIENT_RECEIVED.inc(len(data))
        return data

    async def _send(self, conn: Any, msg: object) -> None:
        data = wire.encode(msg)
        self.bytes_sent += len(data)
        metrics.FL_CLIENT_SENT.inc(len(data))
        conn.write(data)
        await conn.drain()

    async def _global_model(self, cid: str) -> Any:
        from swarmlm.model.hf import load_model
        from swarmlm.store.manifest import fetch_model
        if cid != self.current_cid:
            await fetch_model(self.peer, cid, self.model_dir, data_dir=self.data_dir)
            self.current_cid = cid
        model, _ = load_model(self.model_dir)
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def _train(self, model: Any, start: wire.RoundStart) -> tuple[np.ndarray, float, float]:
        import torch

        from swarmlm.data.shards import Batches, eval_windows
        from swarmlm.train.loop import evaluate, lm_loss
        tokens = self._tokens()
        torch.manual_seed(0)
        windows = eval_windows(tokens.val, start.seq_len, EVAL_WINDOWS)
        val_loss = evaluate(model, windows, batch_size=EVAL_WINDOWS)
        if start.dp_sgd_clip != 0 or start.dp_sgd_noise != 0:         # NaN too: refused there
            update, train_loss = self._train_dp_sgd(model, start, tokens.train)
            return update, train_loss, val_loss
        batches = Batches(tokens.train, start.batch_size, start.seq_len, seed=self.seed or 0, stream=start.round)
        update, train_loss = federated.local_train(model, lambda step: batches.get(step), steps=start.local_steps,
                                                   lr=start.lr, mu=start.fedprox_mu, loss_fn=lm_loss)
        return update, train_loss, val_loss

    def _train_dp_sgd(self, model: Any, start: wire.RoundStart, train: np.ndarray) -> tuple[np.ndarray, float]:
        """Local DP-SGD over this client's examples, the disjoint windows of seq_len + 1 train tokens."""
        import torch
        import torch.nn.functional as F
        federated.check_dp_sgd(start.dp_sgd_clip, start.dp_sgd_noise, start.dp_delta)
        width = start.seq_len + 1
        n = len(train) // width
        if n < start.batch_size:
            raise UserError(f"this client cannot honour DP-SGD: its data holds {n} examples of {width} tokens, fewer "
                            f"than the batch size {start.batch_size} (the Poisson rate would exceed 1)")
        event = (start.batch_size / n, start.dp_sgd_noise)
        if self.dp_sgd_event not in (None, event):
            raise UserError(f"the run changed its DP-SGD event from (q, sigma) = {self.dp_sgd_event} to {event}")
        windows = np.asarray(train[:n * width], dtype=np.int64).reshape(n, width)

        def examples(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
            w = torch.from_numpy(windows[idx])                    # (b, T+1)
            return w[:, :-1], w[:, 1:]

        def sample_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))

        rng = np.random.default_rng(self._secret_seed(start, "dp-sgd sampling"))             # the Poisson draws
        noise_seed = np.random.default_rng(self._secret_seed(start, "dp-sgd noise")).integers(1 << 62)
        generator = torch.Generator().manual_seed(int(noise_seed))                          # the noise
        update, loss = federated.local_train_dp_sgd(
            model, examples, n, steps=start.local_steps, lr=start.lr, mu=start.fedprox_mu, batch_size=start.batch_size,
            clip=start.dp_sgd_clip, noise_multiplier=start.dp_sgd_noise, per_sample_loss=sample_loss, rng=rng,
            generator=generator)
        self.dp_sgd_event = event
        self.dp_sgd_steps += start.local_steps
        return update, loss

    def _tokens(self):
        if self.tokens is None:
            from swarmlm.data.corpus import open_corpus
            from swarmlm.data.shards import prepare_tokens
            from swarmlm.model.tokenizer import Tokenizer
            if not (self.model_dir / "tokenizer.json").is_file():
                raise UserError("the run's model carries no tokenizer.json: clients cannot read their text")
            cache = Path(self.data_dir).expanduser() / "fl-tokens" if self.data_dir else None
            self.tokens = prepare_tokens(open_corpus(self.data), Tokenizer.load(self.model_dir), cache_dir=cache,
                                         progress=False)
        return self.tokens
