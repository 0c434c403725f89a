"""What moves parts between members: one interface, and the round state both transports share.

    class PartTransport(Protocol):
        async def exchange(self, rnd, owner, parts) -> list[int]   # the parts it could not carry
        def round_over(self, rnd) -> None
        async def close(self) -> None

Two transports implement it: side.py (the peer's encrypted side channel, one connection per
pair of members and round) and streams.py (libp2p streams, one per part). The round driver
(allreduce.py) tries them in order for each owner: what the first cannot carry, because the
owner cannot be reached directly or the connection broke, goes over the next.

`Round` is the state of one round that transports read and write, passed to them explicitly:
the sender's side (its vector, weight and the `Assembly` replies land in) and the owner's side
(contributions arriving from any transport, each owned part's result awaited by every sender).
`RoundTable` finds the round a connection or a stream names, waiting a while for it to start
here, and refuses peers that are not its members. Knows nothing of sockets or wire formats.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable
from typing import Any, Protocol

import torch

from swarmlm.collab import compression as codecs
from swarmlm.collab.matchmaking import Group
from swarmlm.collab.parts import Assembly, Contribution, OwnedPart, PartPlan, PartResult, combine
from swarmlm.errors import RoundFailed, WireError
from swarmlm.log import get_logger

log = get_logger(__name__)

_FINISHED_KEPT = 256               # group IDs remembered after their round, to refuse late senders


def round_failed(message: str, suspects: set[str] | frozenset[str] = frozenset()) -> RoundFailed:
    """A `RoundFailed` carrying the peers suspected of causing it (`.suspects`)."""
    e = RoundFailed(message)
    e.suspects = set(suspects)
    return e


async def first_failure(aws: list[Awaitable[Any]]) -> None:
    """Run `aws` together; on the first exception cancel the rest and raise it."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    if not tasks:
        return
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            if t.exception() is not None:
                raise t.exception()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Round:
    """One round at this member: built by the driver, handed to the transports."""

    def __init__(self, group: Group, plan: PartPlan, vector: torch.Tensor, weight: float, *,
                 aggregator: str, compression: str, deadline: float):
        self.group = group
        self.deadline = deadline                 # time.monotonic() by which the round must be done
        self.plan = plan
        self.vector = vector                     # (numel,) float32, never written
        self.weight = weight
        self.aggregator = aggregator
        self.compression = compression
        self.assembly = Assembly(plan, vector.numel())
        self.owned = {p: OwnedPart(plan.size(p)) for p in plan.owned}
        loop = asyncio.get_running_loop()
        self._results: dict[int, asyncio.Future] = {p: loop.create_future() for p in plan.owned}
        self._payloads: dict[tuple[int, str], Any] = {}
        self.dropped: list[tuple[str, int, str]] = []    # (sender, part, reason) dropped here
        self.bytes_sent = 0                      # on the wire, every transport and direction
        self.bytes_received = 0

    @property
    def group_id(self) -> bytes:
        return self.group.group_id

    # ---- the sender's side -----------------------------------------------------------------------

    def encode(self, part: int, form: str) -> Any:
        """This member's slice for `part`: "message" (compression.encode) or "raw" (encode_raw)."""
        a, b = self.plan.bounds[part]
        encode = codecs.encode if form == "message" else codecs.encode_raw
        return encode(self.vector[a:b], self.compression)

    def deliver(self, part: int, values: torch.Tensor, total_weight: float, owner: str) -> None:
        """An owner's aggregate for `part`; `RoundFailed` naming the owner if it is garbage."""
        try:
            self.assembly.accept(part, values, total_weight)
        except WireError as e:
            raise round_failed(f"{owner} answered part {part} with garbage: {e}", {owner}) from None

    # ---- the owner's side ------------------------------------------------------------------------

    def contribute(self, part: int, sender: str, contribution: Contribution) -> None:
        """`sender`'s contribution to an owned part (a repeat keeps the first); completes the part
        when every member's has arrived."""
        own = self.owned[part]
        result = self._results[part]
        if result.done() or not own.add(sender, contribution) or not own.complete(len(self.plan.members)):
            return
        try:
            res = combine(own, aggregator=self.aggregator, compression=self.compression)
        except ValueError as e:
            result.set_exception(round_failed(f"part {part} of step {self.group.step}: {e}"))
            result.exception()                   # mark retrieved: the senders may be gone
            return
        for s, reason in res.dropped:
            log.warning("step %d part %d: dropped the update of %s: %s", self.group.step, part, s, reason)
            self.dropped.append((s, part, reason))
        result.set_result(res)

    async def result(self, part: int) -> PartResult:
        """The aggregate of an owned part once complete; `RoundFailed` if the round failed first."""
        return await asyncio.shield(self._results[part])

    def payload(self, part: int, form: str) -> Any:
        """The aggregate of a complete owned part as sent, encoded once per form ("message" / "raw")."""
        key = (part, form)
        if key not in self._payloads:
            encode = codecs.encode if form == "message" else codecs.encode_raw
            self._payloads[key] = encode(self._results[part].result().aggregate, self.compression)
        return self._payloads[key]

    def fail(self, reason: str) -> None:
        """Fail every owned part still open, so senders waiting on them learn at once."""
        for result in self._results.values():
            if not result.done():
                result.set_exception(RoundFailed(reason))
                result.exception()


class RoundTable:
    """The rounds running at this member, by group ID, and those just finished."""

    def __init__(self, *, wait_for_round_s: float):
        self.wait_for_round_s = wait_for_round_s  # how long a sender may wait for a round to start here
        self._rounds: dict[bytes, Round] = {}
        self._started: dict[bytes, asyncio.Event] = {}
        self._finished: collections.deque[bytes] = collections.deque(maxlen=_FINISHED_KEPT)

    def start(self, rnd: Round) -> None:
        self._rounds[rnd.group_id] = rnd
        self._started.setdefault(rnd.group_id, asyncio.Event()).set()

    def finish(self, rnd: Round) -> None:
        self._rounds.pop(rnd.group_id, None)
        self._started.pop(rnd.group_id, None)
        self._finished.append(rnd.group_id)

    async def find(self, group_id: bytes, sender: str) -> Round:
        """The round `group_id` once it runs here; `RoundFailed` if it is over or never starts,
        `WireError` if `sender` is not one of its members."""
        if group_id in self._finished:
            raise RoundFailed(f"round {group_id.hex()[:8]} is over here")
        if group_id not in self._rounds:
            started = self._started.setdefault(group_id, asyncio.Event())
            try:
                await asyncio.wait_for(started.wait(), self.wait_for_round_s)
            except asyncio.TimeoutError:
                raise RoundFailed(f"round {group_id.hex()[:8]} never started here") from None
            finally:
                if group_id not in self._rounds:
                    self._started.pop(group_id, None)
        rnd = self._rounds.get(group_id)
        if rnd is None:
            raise RoundFailed(f"round {group_id.hex()[:8]} is over here")
        if sender not in rnd.plan.members:
            raise WireError(f"{sender} is not a member of round {group_id.hex()[:8]}")
        return rnd


class PartTransport(Protocol):
    """Carries this member's parts to one owner and the owner's aggregates back into the round's
    `Assembly`; serves other members' parts into `RoundTable` rounds."""

    async def exchange(self, rnd: Round, owner: str, parts: list[int]) -> list[int]:
        """Send `parts` to `owner` and deliver each reply; the parts left unanswered because this
        transport cannot carry them (the next transport takes those). `RoundFailed` if the round
        cannot succeed whatever carries the rest (the owner failed its part, or answered garbage)."""
        ...

    def round_over(self, rnd: Round) -> None:
        """The round has ended here (success or failure): let go of what was kept for it."""
        ...

    async def close(self) -> None:
        ...
