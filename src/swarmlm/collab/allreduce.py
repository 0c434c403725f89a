"""The averaging round: a butterfly all-reduce over parts, with a known member list.

    reducer = await AllReduce.create(peer, aggregator="centered-clip", compression="int8")
    result = await reducer.run(group, vector, weight=n_samples, timeout_s=30)   # or RoundFailed

Every member sends each part of its (numel,) vector to the part's owner and gets the
aggregate back (parts.py says who owns what and how a part is combined). Each member sends
and receives (n-1)/n of the vector.

Transports (transport.py): with `transport="auto"` (the default) parts travel over the peer's
side channel (side.py: one connection per pair of members and round, AES-256-GCM encrypted and
authenticated), several times faster than libp2p streams; an owner that cannot be reached
directly, or a connection that breaks or fails a record, has its remaining parts sent over
libp2p streams (streams.py) instead, so correctness never depends on the side channel.
`transport="libp2p"` sends every part over libp2p streams and serves none over the side
channel, so other members reach it over libp2p too. Every member serves libp2p streams.

A round succeeds only if every part came back aggregated; otherwise — a member vanished,
timed out, or an owner answered garbage — it raises `RoundFailed` naming the suspects, and
owners fail their parts too so the other members learn at once. The input vector is never
modified; a caller applies a result only on success, so a partly averaged tensor can never
pass as success. Knows nothing of models or optimizers.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from swarmlm.collab import compression as codecs
from swarmlm.collab.matchmaking import Group
from swarmlm.collab.parts import MAX_PART_ELEMS, Contribution, PartPlan, part_bounds, suspects
from swarmlm.collab.robust import AGGREGATORS
from swarmlm.collab.side import SideTransport
from swarmlm.collab.streams import StreamTransport
from swarmlm.collab.transport import PartTransport, Round, RoundTable, round_failed
from swarmlm.log import get_logger

log = get_logger(__name__)

TRANSPORTS = ("auto", "libp2p")    # auto: the side channel where reachable, else libp2p; libp2p: libp2p only


@dataclass(frozen=True)
class RoundResult:
    vector: torch.Tensor                               # (numel,) the aggregate, a new tensor
    group: Group
    total_weight: float                                # smallest summed weight over parts
    dropped: list[tuple[str, int, str]] = field(default_factory=list)  # (sender, part, reason) dropped here
    bytes_sent: int = 0
    bytes_received: int = 0
    seen: dict[str, float] = field(default_factory=dict)   # member -> weight its contribution carried to
                                                            # the parts this member owned (round records)


class AllReduce:
    """Runs rounds for this peer and serves its parts to the other members."""

    def __init__(self, peer: Any, rounds: RoundTable, transports: list[PartTransport], *, aggregator: str,
                 compression: str, max_part_elems: int):
        self.peer = peer
        self.rounds = rounds
        self.transports = transports               # tried in order for each owner; the last carries all
        self.aggregator = aggregator
        self.compression = compression
        self.max_part_elems = max_part_elems
        self.bytes_sent = 0                        # totals over all rounds, every transport and direction
        self.bytes_received = 0

    @classmethod
    async def create(cls, peer: Any, *, aggregator: str = "mean", compression: str = "none",
                     max_part_elems: int = MAX_PART_ELEMS, transport: str = "auto",
                     wait_for_round_s: float = 30.0) -> AllReduce:
        """`wait_for_round_s`: how long a member's parts may wait here for the round to start."""
        if transport not in TRANSPORTS:
            raise ValueError(f"unknown transport {transport!r}; expected one of {TRANSPORTS}")
        if aggregator not in AGGREGATORS:
            raise ValueError(f"unknown aggregator {aggregator!r}; expected one of {AGGREGATORS}")
        if compression not in codecs.CODECS:
            raise ValueError(f"unknown compression {compression!r}; expected one of {codecs.CODECS}")
        rounds = RoundTable(wait_for_round_s=wait_for_round_s)
        transports: list[PartTransport] = [await StreamTransport.create(peer, rounds)]
        if transport == "auto":
            transports.insert(0, await SideTransport.create(peer, rounds, max_part_elems=max_part_elems))
        return cls(peer, rounds, transports, aggregator=aggregator, compression=compression,
                   max_part_elems=max_part_elems)

    async def close(self) -> None:
        """Stop using the side channel (rounds still running go on over libp2p)."""
        for t in self.transports:
            await t.close()

    async def run(self, group: Group, vector: torch.Tensor, *, weight: float, timeout_s: float) -> RoundResult:
        """Aggregate `vector` (numel,) float32 over `group`; `RoundFailed` unless every part succeeds."""
        vector = vector.detach().reshape(-1).float()
        if len(group.members) == 1:
            return RoundResult(vector.clone(), group, float(weight))
        plan = PartPlan(group.members, self.peer.peer_id,
                        part_bounds(vector.numel(), len(group.members), self.max_part_elems))
        rnd = Round(group, plan, vector, float(weight), aggregator=self.aggregator, compression=self.compression,
                    deadline=time.monotonic() + timeout_s)
        for p in plan.owned:
            a, b = plan.bounds[p]
            rnd.contribute(p, plan.me, Contribution(vector[a:b], float(weight)))
        self.rounds.start(rnd)
        if len(self.transports) > 1:       # one connection per owner; what it cannot carry goes on
            work = [self._exchange_with(rnd, owner, parts) for owner, parts in plan.sends().items()]
        else:                              # part by part, in the global order every member uses
            work = [self.transports[0].exchange(rnd, plan.owner(p), [p]) for p in plan.sent()]
        tasks = [asyncio.ensure_future(w) for w in work]
        tasks += [asyncio.ensure_future(self._collect(rnd, p)) for p in plan.owned]
        try:
            done, pending = await asyncio.wait(tasks, timeout=timeout_s, return_when=asyncio.FIRST_EXCEPTION)
            failure = next((t.exception() for t in done if t.exception() is not None), None)
            if pending or failure is not None:
                reason = (f"round {group.group_id.hex()[:8]} of step {group.step} failed: "
                          f"{failure if failure is not None else f'timed out after {timeout_s:.1f} s'}")
                rnd.fail(reason)
                raise round_failed(reason, suspects(plan, rnd.owned, set(getattr(failure, "suspects", ())),
                                                    timed_out=failure is None))
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.rounds.finish(rnd)
            for t in self.transports:
                t.round_over(rnd)
            self.bytes_sent += rnd.bytes_sent
            self.bytes_received += rnd.bytes_received
        assert rnd.assembly.complete
        seen = {s: c.weight for own in rnd.owned.values() for s, c in own.contribs.items() if c.reason is None}
        return RoundResult(rnd.assembly.out, group, rnd.assembly.total_weight(), rnd.dropped,
                           rnd.bytes_sent, rnd.bytes_received, seen)

    async def _exchange_with(self, rnd: Round, owner: str, parts: list[int]) -> None:
        """Every part `owner` owns, over the first transport that carries it."""
        for transport in self.transports:
            parts = await transport.exchange(rnd, owner, parts)
            if not parts:
                return
        raise AssertionError(f"no transport carried parts {parts} to {owner}")

    @staticmethod
    async def _collect(rnd: Round, part: int) -> None:
        result = await rnd.result(part)
        rnd.assembly.accept(part, result.local, result.total_weight)
