"""The averaging round: a butterfly all-reduce over parts, with a known member list.

    reducer = await AllReduce.create(peer, aggregator="centered-clip", compression="int8")
    result = await reducer.run(group, vector, weight=n_samples, timeout_s=30)   # or RoundFailed

The flat (numel,) vector is cut into parts; member i of the sorted member list owns parts
i, i + n, ... (at least one each; more for big vectors, so no message exceeds `MAX_PART_ELEMS`).
Every member sends each part to its owner in one `part` call (a libp2p stream) whose reply is the aggregate:
the owner waits until every member's contribution for that part has arrived, drops the
malformed ones (wrong shape or dtype, NaN/inf, undecodable) with a logged reason, combines
the rest with the robust aggregator, and answers each caller with the same encoded result.
It keeps the decoded form of what it sent, so with lossy compression every member still
ends with bit-identical values. Each member sends and receives (n-1)/n of the vector.

A round succeeds only if every part came back aggregated; otherwise — a member vanished,
timed out, or an owner answered garbage — it raises `RoundFailed` naming the suspects, and
owners fail their parts too so the other members learn at once. The input vector is never
modified; a caller applies a result only on success, so a partly averaged tensor can never
pass as success. Knows nothing of models or optimizers.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import torch

from swarmlm import serialize
from swarmlm.collab import compression as codecs
from swarmlm.collab.matchmaking import Group
from swarmlm.collab.robust import AGGREGATORS, aggregate, validate_updates
from swarmlm.errors import PeerError, PeerTimeout, RemoteError, RoundFailed, WireError
from swarmlm.log import get_logger

log = get_logger(__name__)

PART_HANDLER = "swarmlm/collab/part/1"
MAX_PART_ELEMS = 1 << 18           # 1 MiB of float32 per message: several streams in flight fill the pipe
MAX_REQUEST_BYTES = 16 * 1024 * 1024
_IN_FLIGHT = 8                     # concurrent part calls per round
_STREAM_RETRIES = 2                # a broken stream is retried; the owner answers a repeat with the same result
_FINISHED_KEPT = 256               # group IDs remembered after their round, to refuse late calls


async def call_part(peer: Any, owner: str, request: bytes, *, timeout_s: float) -> bytes:
    """Send one encoded `PartRequest` to the part's owner; its reply (an encoded `PartReply`).

    Parts travel over a libp2p stream each (`Peer.call_stream`): on p2pd that moves several
    times more bytes per second than a unary call over the daemon's control connection."""
    chunks = [c async for c in peer.call_stream(owner, PART_HANDLER, request, timeout_s=timeout_s,
                                                max_chunk_bytes=MAX_REQUEST_BYTES)]
    return b"".join(chunks)


def round_failed(message: str, suspects: set[str] = frozenset()) -> RoundFailed:
    """A `RoundFailed` carrying the peers suspected of causing it (`.suspects`)."""
    e = RoundFailed(message)
    e.suspects = set(suspects)
    return e


@dataclass(frozen=True)
class PartRequest:
    group_id: bytes
    part: int
    weight: float                  # the sender's sample count (mean weights by it)
    payload: bytes                 # compression.encode of the sender's slice


@dataclass(frozen=True)
class PartReply:
    payload: bytes                 # compression.encode of the aggregate
    total_weight: float            # summed weight of the contributions kept
    n_kept: int                    # contributions aggregated


@dataclass(frozen=True)
class RoundResult:
    vector: torch.Tensor                               # (numel,) the aggregate, a new tensor
    group: Group
    total_weight: float                                # smallest summed weight over parts
    dropped: list[tuple[str, int, str]] = field(default_factory=list)  # (sender, part, reason) dropped here
    bytes_sent: int = 0
    bytes_received: int = 0


def part_bounds(numel: int, n_members: int, max_part_elems: int = MAX_PART_ELEMS) -> list[tuple[int, int]]:
    """[start, end) of each part: a multiple of n_members parts, near-equal, none over max_part_elems."""
    n_parts = max(1, math.ceil(numel / max_part_elems))
    n_parts = math.ceil(n_parts / n_members) * n_members
    edges = [numel * i // n_parts for i in range(n_parts + 1)]
    return list(itertools.pairwise(edges))


@dataclass
class _OwnedPart:
    size: int
    contribs: dict[str, tuple[torch.Tensor | None, float, str | None]] = field(default_factory=dict)
    result: asyncio.Future | None = None     # -> (payload, local tensor, total_weight, n_kept)


class _Round:
    def __init__(self, group: Group, me: str, bounds: list[tuple[int, int]]):
        self.group = group
        self.me = me
        self.bounds = bounds
        n = len(group.members)
        self.index = group.members.index(me)
        loop = asyncio.get_running_loop()
        self.owned = {p: _OwnedPart(b - a, result=loop.create_future())
                      for p, (a, b) in enumerate(bounds) if p % n == self.index}
        self.dropped: list[tuple[str, int, str]] = []
        self.bytes_sent = 0
        self.bytes_received = 0

    def owner(self, part: int) -> str:
        return self.group.members[part % len(self.group.members)]

    def fail(self, reason: str) -> None:
        for own in self.owned.values():
            if not own.result.done():
                own.result.set_exception(RoundFailed(reason))
                own.result.exception()            # mark retrieved: handlers may be gone


class AllReduce:
    """Runs rounds for this peer and serves its parts to the other members."""

    def __init__(self, peer: Any, *, aggregator: str, compression: str, max_part_elems: int):
        if aggregator not in AGGREGATORS:
            raise ValueError(f"unknown aggregator {aggregator!r}; expected one of {AGGREGATORS}")
        if compression not in codecs.CODECS:
            raise ValueError(f"unknown compression {compression!r}; expected one of {codecs.CODECS}")
        self.peer = peer
        self.aggregator = aggregator
        self.compression = compression
        self.max_part_elems = max_part_elems
        self.bytes_sent = 0                       # totals over all rounds, both directions of every call
        self.bytes_received = 0
        self._rounds: dict[bytes, _Round] = {}
        self._started: dict[bytes, asyncio.Event] = {}   # group ID -> set once its round runs here
        self._finished: collections.deque[bytes] = collections.deque(maxlen=_FINISHED_KEPT)
        self.wait_for_round_s = 30.0              # how long a call may wait for its round to start here

    @classmethod
    async def create(cls, peer: Any, *, aggregator: str = "mean", compression: str = "none",
                     max_part_elems: int = MAX_PART_ELEMS) -> AllReduce:
        reducer = cls(peer, aggregator=aggregator, compression=compression, max_part_elems=max_part_elems)
        await peer.add_stream_handler(PART_HANDLER, reducer._serve_part, max_request_bytes=MAX_REQUEST_BYTES)
        return reducer

    # ---- one round ----------------------------------------------------------------------------

    async def run(self, group: Group, vector: torch.Tensor, *, weight: float, timeout_s: float) -> RoundResult:
        """Aggregate `vector` (numel,) float32 over `group`; `RoundFailed` unless every part succeeds."""
        me = self.peer.peer_id
        vector = vector.detach().reshape(-1).float()
        if len(group.members) == 1:
            return RoundResult(vector.clone(), group, float(weight))
        bounds = part_bounds(vector.numel(), len(group.members), self.max_part_elems)
        rnd = _Round(group, me, bounds)
        out = torch.empty_like(vector)
        weights: list[float] = []                 # summed weight behind each part, as its owner reports
        for p in rnd.owned:
            a, b = bounds[p]
            self._add(rnd, p, me, vector[a:b], float(weight), None)
        self._rounds[group.group_id] = rnd
        self._started.setdefault(group.group_id, asyncio.Event()).set()
        # every member sends in the same global part order: with a bounded number of calls in
        # flight, the lowest unfinished part is then in flight at all its senders, so no deadlock
        deadline = time.monotonic() + timeout_s
        gate = asyncio.Semaphore(_IN_FLIGHT)
        tasks = [asyncio.ensure_future(self._exchange(rnd, p, vector, float(weight), out, weights, gate, deadline))
                 for p in range(len(bounds)) if p not in rnd.owned]
        tasks += [asyncio.ensure_future(self._collect(rnd, p, out, weights)) for p in rnd.owned]
        try:
            done, pending = await asyncio.wait(tasks, timeout=timeout_s, return_when=asyncio.FIRST_EXCEPTION)
            failure = next((t.exception() for t in done if t.exception() is not None), None)
            if pending or failure is not None:
                for t in pending:
                    t.cancel()
                suspects = self._suspects(rnd, tasks, failure, timed_out=failure is None)
                reason = (f"round {group.group_id.hex()[:8]} of step {group.step} failed: "
                          f"{failure if failure is not None else f'timed out after {timeout_s:.1f} s'}")
                rnd.fail(reason)
                raise round_failed(reason, suspects)
        finally:
            self._rounds.pop(group.group_id, None)
            self._started.pop(group.group_id, None)
            self._finished.append(group.group_id)
            self.bytes_sent += rnd.bytes_sent
            self.bytes_received += rnd.bytes_received
        return RoundResult(out, group, min(weights) if weights else float(weight), rnd.dropped,
                           rnd.bytes_sent, rnd.bytes_received)

    async def _exchange(self, rnd: _Round, part: int, vector: torch.Tensor, weight: float, out: torch.Tensor,
                        weights: list[float], gate: asyncio.Semaphore, deadline: float) -> None:
        a, b = rnd.bounds[part]
        owner = rnd.owner(part)
        async with gate:
            payload = codecs.encode(vector[a:b], self.compression)
            request = serialize.encode_message(PartRequest(rnd.group.group_id, part, weight, payload))
            del payload
            rnd.bytes_sent += len(request)
            left = max(0.01, deadline - time.monotonic())
            for attempt in range(_STREAM_RETRIES + 1):
                try:
                    reply_bytes = await call_part(self.peer, owner, request, timeout_s=left)
                    break
                except RemoteError as e:          # the owner is up but its part failed
                    raise round_failed(str(e)) from None
                except PeerTimeout as e:
                    raise round_failed(str(e), {owner}) from None
                except PeerError as e:            # the owner vanished, or the stream broke: ask again
                    left = deadline - time.monotonic()
                    if attempt == _STREAM_RETRIES or left <= 0:
                        raise round_failed(str(e), {owner}) from None
                    log.info("part %d to %s: %s; asking again", part, owner, e)
        rnd.bytes_received += len(reply_bytes)
        try:
            reply = serialize.decode_message(reply_bytes, PartReply, max_bytes=MAX_REQUEST_BYTES)
            t = codecs.decode(reply.payload, self.compression, numel=b - a)
            if not math.isfinite(float(t.sum(dtype=torch.float64))):
                raise WireError(f"part {part} contains NaN or inf")
        except WireError as e:
            raise round_failed(f"{owner} answered part {part} with garbage: {e}", {owner}) from None
        out[a:b] = t
        weights.append(reply.total_weight)

    async def _collect(self, rnd: _Round, part: int, out: torch.Tensor, weights: list[float]) -> None:
        _, local, total_weight, _ = await rnd.owned[part].result
        a, b = rnd.bounds[part]
        out[a:b] = local
        weights.append(total_weight)

    @staticmethod
    def _suspects(rnd: _Round, tasks: list[asyncio.Future], failure: BaseException | None, timed_out: bool
                  ) -> set[str]:
        suspects: set[str] = set(getattr(failure, "suspects", ()))
        if timed_out:
            for own in rnd.owned.values():
                suspects |= set(rnd.group.members) - set(own.contribs)
        suspects.discard(rnd.me)
        return suspects

    # ---- owning parts ---------------------------------------------------------------------------

    def _add(self, rnd: _Round, part: int, sender: str, t: torch.Tensor | None, weight: float,
             reason: str | None) -> None:
        own = rnd.owned[part]
        own.contribs[sender] = (t, weight, reason)
        if len(own.contribs) == len(rnd.group.members) and not own.result.done():
            own.result.set_result(self._aggregate(rnd, part, own))

    def _aggregate(self, rnd: _Round, part: int, own: _OwnedPart) -> tuple[bytes, torch.Tensor, float, int]:
        updates = [(s, t, w) for s, (t, w, reason) in own.contribs.items() if reason is None]
        kept, dropped = validate_updates(updates, shape=(own.size,), dtype=torch.float32)
        dropped += [(s, reason) for s, (_, _, reason) in own.contribs.items() if reason is not None]
        for sender, reason in dropped:
            log.warning("step %d part %d: dropped the update of %s: %s", rnd.group.step, part, sender, reason)
            rnd.dropped.append((sender, part, reason))
        agg = aggregate(self.aggregator, [t for _, t, _ in kept], [w for _, _, w in kept])
        payload = codecs.encode(agg, self.compression)
        local = agg if self.compression == "none" else codecs.decode(payload, self.compression, numel=own.size)
        return payload, local, sum(w for _, _, w in kept), len(kept)

    async def _serve_part(self, peer_id: str, request: bytes) -> AsyncIterator[bytes]:
        yield await self.rpc_part(peer_id, request)

    async def rpc_part(self, peer_id: str, request: bytes) -> bytes:
        req = serialize.decode_message(request, PartRequest, max_bytes=MAX_REQUEST_BYTES)
        rnd = await self._find_round(req.group_id)
        if peer_id not in rnd.group.members:
            raise WireError(f"{peer_id} is not a member of round {req.group_id.hex()[:8]}")
        own = rnd.owned.get(req.part)
        if own is None:
            raise WireError(f"part {req.part} is not owned by this peer")
        rnd.bytes_received += len(request)
        if peer_id not in own.contribs:           # a repeat (the caller's stream broke) keeps the first
            try:
                t, reason = codecs.decode(req.payload, self.compression, numel=own.size), None
            except WireError as e:
                t, reason = None, str(e)
            if not own.result.done():
                self._add(rnd, req.part, peer_id, t, req.weight, reason)
        payload, _, total_weight, n_kept = await asyncio.shield(own.result)
        reply = serialize.encode_message(PartReply(payload, total_weight, n_kept))
        rnd.bytes_sent += len(reply)
        return reply

    async def _find_round(self, group_id: bytes) -> _Round:
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
        return rnd
