"""The client of networked private inference: find three parties, open a session, generate.

    tokens, stats = await generate_private(peer, model_id, prompt_ids, vocab_size=V, max_new_tokens=16)

Parties are found under the model's DHT key (signed `MpcPartyRecord`s); the client opens one
side-channel connection to each (encrypted and authenticated by the channel), names the session
and the three parties (HELLO), waits for READY, then per step sends each party its shares of
the new tokens and waits for the three logits components. Any party's ERROR, closed
connection or silence past `step_timeout_s` ends the generation with a `PeerError` naming the
party: a token is only ever picked from three consistent answers. `generate_private_from_args`
is `swarmlm generate MODEL --private`.
Knows nothing of the forward pass (party.py and model.py run it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import Sequence

import torch

from swarmlm.errors import NotFoundError, PeerError, PeerTimeout, RemoteError, UserError, WireError
from swarmlm.model.generate import Emitted, TokenLoop, decode_rate
from swarmlm.p2p import keys
from swarmlm.privacy.mpc import wire
from swarmlm.privacy.mpc.client import MpcStats, open_logits, share_tokens


CLOSED = (asyncio.IncompleteReadError, ConnectionError, OSError)     # a connection that ended


def _why(e: BaseException) -> str:
    return "its connection closed" if isinstance(e, CLOSED) else str(e)


async def find_parties(peer, model_id: str, *, need: int = 3, timeout_s: float = 30.0) -> list[str]:
    """Peer IDs of parties announcing `model_id`, waiting (bounded) until `need` are known."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = []
        for rec in await peer.get(keys.mpc_parties_key(model_id), latest=True):
            if (isinstance(rec.value, wire.MpcPartyRecord) and rec.value.model == model_id and rec.subkey is not None
                    and keys.subkey_owner(rec.subkey) == rec.signer):
                found.append(rec.signer)
        found = sorted(set(found))
        if len(found) >= need:
            return found
        if time.monotonic() > deadline:
            raise NotFoundError(f"found {len(found)} MPC parties of model {model_id}, need {need} "
                                f"(waited {timeout_s:.0f} s)")
        await asyncio.sleep(0.5)


class PrivateSession:
    """One session with three parties; `step(ids)` -> logits (B, V) float32."""

    def __init__(self, conns: list, parties: list[str], vocab_size: int, step_timeout_s: float):
        self.conns, self.parties, self.V, self.step_timeout_s = conns, parties, vocab_size, step_timeout_s
        self.step_no = 0
        self.stats = MpcStats(list(parties))

    @classmethod
    async def open(cls, peer, candidates: Sequence[str], model_id: str, *, vocab_size: int, max_tokens: int,
                   step_timeout_s: float = 60.0, connect_timeout_s: float = 15.0) -> "PrivateSession":
        """Connect to the first three candidates that answer (an announced party may be gone)."""
        side = await peer.side_channel()
        candidates = list(candidates)
        attempts = await asyncio.gather(*(side.open(p, wire.PURPOSE, timeout_s=min(connect_timeout_s, 5.0),
                                                    max_record_bytes=wire.MAX_RECORD_BYTES) for p in candidates),
                                        return_exceptions=True)
        reached = [(p, c) for p, c in zip(candidates, attempts) if not isinstance(c, BaseException)]
        for p, c in reached[3:]:
            c.close()
        if len(reached) < 3:
            for _, c in reached:
                c.close()
            raise NotFoundError(f"only {len(reached)} of {len(candidates)} announced MPC parties could be reached; "
                                f"a private session needs 3")
        parties = [p for p, _ in reached[:3]]
        self = cls([c for _, c in reached[:3]], parties, vocab_size, step_timeout_s)
        session = os.urandom(wire.SESSION_BYTES)
        for i, conn in enumerate(self.conns):
            conn.write(wire.pack(wire.HELLO, wire.ClientHello(session, i, parties, model_id, max_tokens)))
        try:
            await self._gather([self._read(i, wire.READY) for i in range(3)], connect_timeout_s)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for c in self.conns:
            c.close()

    async def _read(self, i: int, kind: int):
        try:
            record = await self.conns[i].read_record()
            got, msg = wire.unpack(record, kind, wire.ERROR)
        except (PeerError, WireError, *CLOSED) as e:
            raise PeerError(f"MPC party {i} ({self.parties[i]}) failed: {_why(e)}") from None
        if got == wire.ERROR:
            raise RemoteError(f"MPC party {i} ({self.parties[i]}) ended the session: {msg.message}")
        return msg

    async def _gather(self, coros, timeout_s: float) -> list:
        tasks = [asyncio.ensure_future(c) for c in coros]
        try:
            done, pending = await asyncio.wait(tasks, timeout=timeout_s, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                if t.exception() is not None:
                    raise t.exception()
            if pending:
                late = [self.parties[i] for i, t in enumerate(tasks) if t in pending]
                raise PeerTimeout(f"MPC parties {late} did not answer within {timeout_s:.0f} s")
            return [t.result() for t in tasks]
        finally:
            for t in tasks:
                t.cancel()

    async def _result(self, i: int) -> tuple[wire.StepResult, torch.Tensor]:
        res = await self._read(i, wire.RESULT)
        if res.step != self.step_no:
            raise PeerError(f"MPC party {i} answered step {res.step} during step {self.step_no}")
        try:
            raw = await self.conns[i].read_record()
        except (PeerError, *CLOSED) as e:
            raise PeerError(f"MPC party {i} ({self.parties[i]}) failed: {_why(e)}") from None
        if len(raw) != self.V * 8:
            raise PeerError(f"MPC party {i} sent {len(raw)} bytes of logits, not {self.V * 8}")
        return res, torch.frombuffer(bytearray(raw), dtype=torch.int64).view(1, self.V).clone()

    async def step(self, ids: torch.Tensor) -> torch.Tensor:
        shares = share_tokens(ids, self.V)
        T = ids.shape[1]
        for i, conn in enumerate(self.conns):
            conn.write(wire.pack(wire.STEP, wire.StepHeader(self.step_no, T)))
            payload = torch.stack([shares[i].a, shares[i].b]).contiguous().numpy().tobytes()
            conn.write(payload)
            self.stats.bytes += len(payload)
        answers = await self._gather([self._result(i) for i in range(3)], self.step_timeout_s)
        self.stats.rounds += max(r.rounds for r, _ in answers)
        self.stats.bytes += sum(r.bytes_sent + self.V * 8 for r, _ in answers)
        self.step_no += 1
        return open_logits([x for _, x in answers])


async def generate_private(peer, model_id: str, prompt_ids: Sequence[int], *, vocab_size: int, max_new_tokens: int,
                           temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                           eos_id: int | None = None, parties: Sequence[str] | None = None,
                           connect_timeout_s: float = 30.0, step_timeout_s: float = 60.0
                           ) -> tuple[list[int], MpcStats, list[float]]:
    """(generated ids, stats, the time each token arrived)."""
    parties = list(parties) if parties else await find_parties(peer, model_id, timeout_s=connect_timeout_s)
    session = await PrivateSession.open(peer, parties, model_id, vocab_size=vocab_size,
                                        max_tokens=len(prompt_ids) + max_new_tokens, step_timeout_s=step_timeout_s)
    try:
        loop = TokenLoop([list(prompt_ids)], max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                         top_p=top_p, generator=torch.Generator().manual_seed(seed), eos_id=eos_id)
        tokens, times = [], []
        while not loop.finished:
            t = loop.take(await session.step(loop.ids))[0]
            if t is None:
                break
            tokens.append(t)
            times.append(time.perf_counter())
        return tokens, session.stats, times
    finally:
        session.close()


def generate_private_from_args(args) -> int:
    """`swarmlm generate MODEL --private --initial-peers ... --prompt TEXT [--json]`."""
    from swarmlm.model.generate import check_sampling_args
    from swarmlm.model.hf import load_config
    from swarmlm.model.tokenizer import Tokenizer
    from swarmlm.p2p.peer import Peer
    from swarmlm.privacy.mpc.source import resolve

    check_sampling_args(args)
    if not args.initial_peers:
        raise UserError("--private needs --initial-peers (the parties are found through the swarm)")

    async def main():
        peer = await Peer.create(initial_peers=args.initial_peers, client_mode=True)
        try:
            model_id, directory = await resolve(args.model, peer=peer, with_weights=False)
            cfg = load_config(directory)
            tokenizer = Tokenizer.load(directory)
            prompt_ids = tokenizer.encode(args.prompt)
            if not prompt_ids:
                raise UserError("the prompt encodes to no tokens")
            if len(prompt_ids) > cfg.context_len:
                raise UserError(f"prompt is {len(prompt_ids)} tokens, longer than the model's context of "
                                f"{cfg.context_len}")
            n_new = max(0, min(args.max_new_tokens, cfg.context_len - len(prompt_ids)))
            eos_id = cfg.eos_token_id if cfg.eos_token_id is not None else tokenizer.eos_id
            out = await generate_private(peer, model_id, prompt_ids, vocab_size=cfg.vocab_size, max_new_tokens=n_new,
                                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                         seed=args.seed, eos_id=eos_id, connect_timeout_s=args.connect_timeout)
            return prompt_ids, eos_id, tokenizer, out
        finally:
            with contextlib.suppress(Exception):
                await peer.shutdown()

    prompt_ids, eos_id, tokenizer, (tokens, stats, times) = asyncio.run(main())
    out = Emitted(tokens, tokenizer.decode([t for t in tokens if t != eos_id]), decode_rate(times))
    if not args.json:
        print(out.text)
    out.report(prompt_ids, as_json=args.json, mpc=stats.as_json(),
               how=f" privately through {len(stats.parties)} MPC parties, {stats.rounds} rounds, "
                   f"{stats.bytes / 1e6:.1f} MB")
    return 0
