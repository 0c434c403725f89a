"""The client's side of private inference: share the tokens, rebuild the logits, sample.

The client turns each step's new token ids into one-hot vectors (B, T, V), splits them into
three replicated sharings (shares.split: fresh uniform components, so each party sees two
uniform ring elements per entry), and sends party i its pair. Each party answers with its
component x_i of the last position's logits; the client alone adds the three, decodes the
fixed point and picks the token (model/generate.py's TokenLoop: greedy or sampling), so no
party ever sees a token, a hidden state or a logit. `MpcStats` counts the whole generation.

`generate_in_process` runs the three parties in this process (runtime.LocalParties): the
reference for tests and benchmarks, and the same numbers as three networked parties.
Knows nothing of the network.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from swarmlm.model.generate import TokenLoop
from swarmlm.model.transformer import Transformer
from swarmlm.privacy.mpc.model import KVShares, PublicWeights, forward
from swarmlm.privacy.mpc.ring import decode
from swarmlm.privacy.mpc.runtime import N_PARTIES, LocalParties
from swarmlm.privacy.mpc.shares import AShare, combine, split


@dataclass
class MpcStats:
    parties: list[str] = field(default_factory=list)   # who computed (peer IDs, or "local-i")
    rounds: int = 0                                    # communication rounds among the parties, all steps
    bytes: int = 0                                     # bytes sent by the parties and the client, all steps

    def as_json(self) -> dict:
        return {"parties": list(self.parties), "rounds": self.rounds, "bytes": self.bytes}


def share_tokens(ids: torch.Tensor, vocab_size: int) -> list[AShare]:
    """Token ids (B, T) -> each party's shares of their one-hot vectors (B, T, V)."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"token ids must lie in 0..{vocab_size - 1}")
    return split(torch.nn.functional.one_hot(ids, vocab_size).to(torch.int64))


def open_logits(components: Sequence[torch.Tensor]) -> torch.Tensor:
    """Party i's component x_i of the logits, for i = 0, 1, 2 -> float32 logits."""
    return decode(combine(list(components))).float()


def generate_in_process(model: Transformer, prompt_ids: Sequence[int], *, max_new_tokens: int,
                        temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                        eos_id: int | None = None, parties: LocalParties | None = None,
                        weights: PublicWeights | None = None) -> tuple[list[int], MpcStats]:
    """Private generation with the three parties in threads of this process."""
    weights = weights or PublicWeights.from_model(model)
    parties = parties or LocalParties()
    caches = [KVShares() for _ in range(N_PARTIES)]
    stats = MpcStats([f"local-{i}" for i in range(N_PARTIES)])
    rounds0, bytes0 = parties.rounds, parties.bytes_sent
    vocab = model.cfg.vocab_size

    def step(ids: torch.Tensor, key_mask) -> torch.Tensor:
        shares = share_tokens(ids, vocab)
        stats.bytes += sum(2 * s.a.numel() * 8 for s in shares)          # client -> parties
        out = parties.run(lambda p: forward(p, weights, shares[p.index], caches[p.index]))
        stats.bytes += sum(o.a.numel() * 8 for o in out)                  # parties -> client
        return open_logits([o.a for o in out])

    generator = torch.Generator().manual_seed(seed)
    loop = TokenLoop([list(prompt_ids)], max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                     top_p=top_p, generator=generator, eos_id=eos_id)
    tokens: list[int] = []
    while not loop.finished:
        t = loop.take(step(loop.ids, loop.key_mask))[0]
        if t is None:
            break
        tokens.append(t)
    stats.rounds = parties.rounds - rounds0
    stats.bytes += parties.bytes_sent - bytes0
    return tokens, stats
