"""The demo's private-inference step: three MPC parties join the demo's swarm, and a client
generates a few tokens through them without any of them seeing the prompt or the output.

    run = private_generation(cid, initial, model_dir, prompt_ids, root, child, n_tokens=4)
    print(run.line())          # "private: 4 tokens through 3 MPC parties, 1460 rounds, 5.1 MB, 9.8 s: equal to local greedy"

`child` is the demo's own (start-and-register-for-stop) wrapper, so the parties are stopped
with every other child. Wires processes and library calls together; holds no logic of its own.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from swarmlm.demo.children import start_peer_process
from swarmlm.demo.summary import Part
from swarmlm.model.generate import generate
from swarmlm.model.hf import load_model
from swarmlm.p2p.process import PeerProcess

STARTUP_S = 120.0


@dataclass(frozen=True)
class PrivateRun:
    tokens: list[int]            # what the three parties produced (the client opened only logits)
    local_tokens: list[int]      # local greedy decoding of the same weights
    parties: list[str]
    rounds: int
    bytes: int
    seconds: float               # the generation, parties' start-up excluded

    @property
    def equal(self) -> bool:
        return self.tokens == self.local_tokens

    def line(self) -> str:
        verdict = "equal to local greedy" if self.equal else "FAILED: differs from local greedy"
        return (f"private: {len(self.tokens)} tokens through {len(self.parties)} MPC parties, {self.rounds} rounds, "
                f"{self.bytes / 1e6:.1f} MB, {self.seconds:.1f} s: {verdict}")

    def part(self) -> Part:
        found = [] if self.equal else [f"private generation gave {self.tokens}, local greedy {self.local_tokens}"]
        return Part("private", [f"  private     {self.line().removeprefix('private: ')}"], found, self.as_json())

    def as_json(self) -> dict:
        return {"tokens": self.tokens, "local_tokens": self.local_tokens, "parties": self.parties,
                "rounds": self.rounds, "bytes": self.bytes, "seconds": round(self.seconds, 2), "equal": self.equal}


def start_parties(model: str, initial: Sequence[str], root: Path,
                  child: Callable[[PeerProcess], PeerProcess], *, wait: bool = True) -> list[PeerProcess]:
    """Three `swarmlm mpc-party MODEL` processes joining through `initial` (ready, with `wait`)."""
    parties = [child(start_peer_process(["mpc-party", model, "--initial-peers", *initial, "--data-dir",
                                         root / f"mpc{i}", "--host", "127.0.0.1"],
                                        log_path=root / f"mpc{i}" / "party.log", wait=False)) for i in range(3)]
    for p in parties if wait else ():
        p.wait_ready(STARTUP_S)
    return parties


def private_generation(model: str, initial: Sequence[str], model_dir: Path, prompt_ids: list[int], root: Path,
                       child: Callable[[PeerProcess], PeerProcess], *, n_tokens: int = 4,
                       parties: list[PeerProcess] | None = None) -> PrivateRun:
    """Start three parties of `model` (a manifest CID or a directory; or take `parties`, started by
    `start_parties`), generate `n_tokens` greedily through them, and compare with local greedy
    decoding of `model_dir` (the same weights)."""
    from swarmlm.p2p.peer import Peer
    from swarmlm.privacy.mpc.remote import generate_private
    from swarmlm.privacy.mpc.source import resolve

    if parties is None:
        parties = start_parties(model, initial, root, child)
    for p in parties:
        p.wait_ready(STARTUP_S)
    local, cfg = load_model(model_dir)

    async def run() -> tuple[list[int], object, float]:
        peer = await Peer.create(initial_peers=list(initial), client_mode=True)
        try:
            model_id, _ = await resolve(model, peer=peer, with_weights=False, data_dir=root / "mpc-client")
            t0 = time.perf_counter()
            tokens, stats, _ = await generate_private(peer, model_id, prompt_ids, vocab_size=cfg.vocab_size,
                                                      max_new_tokens=n_tokens, parties=[p.peer_id for p in parties])
            return tokens, stats, time.perf_counter() - t0
        finally:
            await peer.shutdown()

    tokens, stats, seconds = asyncio.run(run())
    expected = generate(local, prompt_ids, max_new_tokens=n_tokens)
    return PrivateRun(tokens, expected, stats.parties, stats.rounds, stats.bytes, seconds)
