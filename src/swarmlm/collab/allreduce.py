"""The averaging round: a butterfly all-reduce over parts, with a known member list.

    reducer = await AllReduce.create(peer, aggregator="centered-clip", compression="int8")
    result = await reducer.run(group, vector, weight=n_samples, timeout_s=30)   # or RoundFailed

The flat (numel,) vector is cut into parts; member i of the sorted member list owns parts
i, i + n, ... (at least one each; more for big vectors, so no message exceeds `MAX_PART_ELEMS`).
Every member sends each part to its owner (see Transport) and gets the aggregate back:
the owner waits until every member's contribution for that part has arrived, drops the
malformed ones (wrong shape or dtype, NaN/inf, undecodable) with a logged reason, combines
the rest with the robust aggregator, and answers each caller with the same encoded result.
It keeps the decoded form of what it sent, so with lossy compression every member still
ends with bit-identical values. Each member sends and receives (n-1)/n of the vector.

Transport: with `transport="auto"` (the default) the members of a group move parts over
direct TCP connections (direct.py: one per pair and round, keyed over libp2p, every frame
authenticated, NOT encrypted), several times faster than libp2p streams; a member that
cannot be reached directly, or a connection that breaks or fails a tag, has its remaining
parts sent over libp2p streams instead, so correctness never depends on the direct path.
`transport="libp2p"` keeps every byte on libp2p's encrypted streams (and asks others to).

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
from swarmlm.collab import direct
from swarmlm.collab.matchmaking import Group
from swarmlm.collab.robust import AGGREGATORS, aggregate, all_finite, validate_updates
from swarmlm.errors import (
    IntegrityError,
    PeerError,
    PeerTimeout,
    RemoteError,
    RoundFailed,
    WireError,
)
from swarmlm.log import get_logger
from swarmlm.p2p import rpc
from swarmlm.p2p.channel.policy import maddr_hosts

log = get_logger(__name__)

PART_HANDLER = "swarmlm/collab/part/1"
MAX_PART_ELEMS = 1 << 18           # 1 MiB of float32 per message: several streams in flight fill the pipe
MAX_REQUEST_BYTES = 16 * 1024 * 1024
_IN_FLIGHT = 8                     # concurrent part calls per round
_STREAM_RETRIES = 2                # a broken stream is retried; the owner answers a repeat with the same result
_FINISHED_KEPT = 256               # group IDs remembered after their round, to refuse late calls
TRANSPORTS = ("auto", "libp2p")    # auto: direct TCP where reachable, else libp2p; libp2p: always encrypted
_OFFER_TIMEOUT_S = 5.0
_POOL_BYTES = 256 << 20            # receive buffers kept between rounds (direct path)
_CONNECT_TIMEOUT_S = 2.0


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


async def first_failure(coros: list[Any]) -> None:
    """Run `coros` together; on the first exception cancel the rest and raise it."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            if t.exception() is not None:
                raise t.exception()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


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
    result: asyncio.Future | None = None     # -> (aggregate, local tensor, total_weight, n_kept)
    payloads: dict[str, Any] = field(default_factory=dict)   # the aggregate as sent: "message" / "raw"


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
        self.buffers: list[bytearray] = []       # pooled receive buffers the round's contributions sit in
        self.serving = 0                         # direct connections still being served for this round
        self.finished = False

    def owner(self, part: int) -> str:
        return self.group.members[part % len(self.group.members)]

    def fail(self, reason: str) -> None:
        for own in self.owned.values():
            if not own.result.done():
                own.result.set_exception(RoundFailed(reason))
                own.result.exception()            # mark retrieved: handlers may be gone


class AllReduce:
    """Runs rounds for this peer and serves its parts to the other members."""

    def __init__(self, peer: Any, *, aggregator: str, compression: str, max_part_elems: int,
                 transport: str = "auto"):
        if transport not in TRANSPORTS:
            raise ValueError(f"unknown transport {transport!r}; expected one of {TRANSPORTS}")
        if aggregator not in AGGREGATORS:
            raise ValueError(f"unknown aggregator {aggregator!r}; expected one of {AGGREGATORS}")
        if compression not in codecs.CODECS:
            raise ValueError(f"unknown compression {compression!r}; expected one of {codecs.CODECS}")
        self.peer = peer
        self.aggregator = aggregator
        self.compression = compression
        self.max_part_elems = max_part_elems
        self.transport = transport
        self.direct: direct.DirectListener | None = None    # set by create() with transport "auto"
        self._pool = direct.BufferPool(_POOL_BYTES)
        self.bytes_sent = 0                       # totals over all rounds, both directions of every call
        self.bytes_received = 0
        self._rounds: dict[bytes, _Round] = {}
        self._started: dict[bytes, asyncio.Event] = {}   # group ID -> set once its round runs here
        self._finished: collections.deque[bytes] = collections.deque(maxlen=_FINISHED_KEPT)
        self.wait_for_round_s = 30.0              # how long a call may wait for its round to start here

    @classmethod
    async def create(cls, peer: Any, *, aggregator: str = "mean", compression: str = "none",
                     max_part_elems: int = MAX_PART_ELEMS, transport: str = "auto",
                     host: str | None = None) -> AllReduce:
        """`host`: where the direct listener binds (default: the host of the peer's first multiaddr)."""
        reducer = cls(peer, aggregator=aggregator, compression=compression, max_part_elems=max_part_elems,
                      transport=transport)
        await peer.add_stream_handler(PART_HANDLER, reducer._serve_part, max_request_bytes=MAX_REQUEST_BYTES)
        await peer.add_handler(direct.OFFER_HANDLER,
                               rpc.message_handler(direct.DirectOffer, reducer.rpc_offer, max_request_bytes=4096),
                               max_request_bytes=4096)
        if transport == "auto":
            hosts = maddr_hosts(peer.maddrs)
            if host is None:      # the peer's one address, or every interface when it announces several
                host = hosts[0] if len(hosts) == 1 else "127.0.0.1" if not hosts else \
                    "::" if any(":" in h for h in hosts) else "0.0.0.0"
            reducer.direct = await direct.DirectListener.create(host, reducer._serve_direct, announce=hosts)
        return reducer

    async def close(self) -> None:
        """Stop the direct listener (rounds still running fall back to libp2p)."""
        if self.direct is not None:
            listener, self.direct = self.direct, None
            await listener.close()

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
        if self.direct is not None:
            by_owner: dict[str, list[int]] = {}
            for p in range(len(bounds)):
                if p not in rnd.owned:
                    by_owner.setdefault(rnd.owner(p), []).append(p)
            tasks = [asyncio.ensure_future(self._exchange_with(rnd, owner, parts, vector, float(weight), out,
                                                               weights, gate, deadline))
                     for owner, parts in by_owner.items()]
        else:
            tasks = [asyncio.ensure_future(self._exchange(rnd, p, vector, float(weight), out, weights, gate,
                                                          deadline))
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
            rnd.finished = True
            self._release(rnd)
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
            if not all_finite(t):
                raise WireError(f"part {part} contains NaN or inf")
        except WireError as e:
            raise round_failed(f"{owner} answered part {part} with garbage: {e}", {owner}) from None
        out[a:b] = t
        weights.append(reply.total_weight)

    async def _exchange_with(self, rnd: _Round, owner: str, parts: list[int], vector: torch.Tensor, weight: float,
                             out: torch.Tensor, weights: list[float], gate: asyncio.Semaphore, deadline: float
                             ) -> None:
        """Every part `owner` owns: over the direct path, and what it did not carry over libp2p."""
        left = await self._direct_exchange(rnd, owner, parts, vector, weight, out, weights, deadline)
        if left:
            await first_failure([self._exchange(rnd, p, vector, weight, out, weights, gate, deadline)
                                 for p in left])

    async def _direct_exchange(self, rnd: _Round, owner: str, parts: list[int], vector: torch.Tensor,
                               weight: float, out: torch.Tensor, weights: list[float], deadline: float
                               ) -> list[int]:
        """Send `parts` to `owner` over a direct connection and read the aggregates back; the parts
        still unanswered when the connection cannot open or breaks (those go over libp2p)."""
        group_id = rnd.group.group_id
        offer = direct.DirectOffer(group_id, direct.new_key())
        try:
            answer = await rpc.call_message(self.peer, owner, direct.OFFER_HANDLER, offer, direct.DirectAnswer,
                                            timeout_s=min(_OFFER_TIMEOUT_S, max(0.01, deadline - time.monotonic())),
                                            max_response_bytes=4096)
            chan = await direct.connect(answer, offer.key, group_id, rnd.me, timeout_s=_CONNECT_TIMEOUT_S)
        except PeerError as e:
            log.debug("no direct path to %s: %s", owner, e)
            return parts
        bounds, pending = rnd.bounds, set(parts)

        def limit(kind: int, part: int) -> int:
            return codecs.frame_bytes(self.compression, bounds[part][1] - bounds[part][0]) if part in pending else 0

        async def send_all() -> None:
            for p in parts:
                a, b = bounds[p]
                await chan.send(direct.PART, part=p, weight=weight,
                                payload=codecs.encode_raw(vector[a:b], self.compression))

        def into(kind: int, part: int, length: int) -> memoryview | None:
            # float32 replies land in `out` itself; a frame that then fails is redone over libp2p
            if self.compression != "none" or kind != direct.REPLY or part not in pending:
                return None
            a, b = bounds[part]
            return serialize.tensor_to_raw(out[a:b])

        async def receive_all() -> None:
            while pending:
                frame, payload = await chan.recv(limit, into)
                if frame.kind == direct.ERROR:
                    message = f"{owner}: {payload.decode('utf-8', 'replace')}"
                    if frame.count == direct.RETRY:
                        raise ConnectionError(message)
                    raise round_failed(message)
                if frame.kind != direct.REPLY or frame.part not in pending:
                    raise round_failed(f"{owner} sent frame kind {frame.kind} for part {frame.part}", {owner})
                a, b = bounds[frame.part]
                try:
                    t = codecs.decode_raw(payload, self.compression, numel=b - a)
                    if not all_finite(t):
                        raise WireError(f"part {frame.part} contains NaN or inf")
                except WireError as e:
                    raise round_failed(f"{owner} answered part {frame.part} with garbage: {e}", {owner}) from None
                if t.data_ptr() != out[a:b].data_ptr():
                    out[a:b] = t
                weights.append(frame.weight)
                pending.discard(frame.part)

        try:
            await first_failure([send_all(), receive_all()])
        except (ConnectionError, OSError, IntegrityError, WireError) as e:
            log.info("direct path to %s broke (%s); %d parts go over libp2p", owner, e, len(pending))
        finally:
            rnd.bytes_sent += chan.bytes_sent
            rnd.bytes_received += chan.bytes_received
            chan.close()
        return sorted(pending)

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
        local = agg if self.compression == "none" else codecs.roundtrip(agg, self.compression)
        return agg, local, sum(w for _, _, w in kept), len(kept)

    def _payload(self, own: _OwnedPart, form: str) -> Any:
        """The aggregate of an owned part as sent: "message" (libp2p) or "raw" (direct), encoded once."""
        if form not in own.payloads:
            agg = own.result.result()[0]
            encode = codecs.encode if form == "message" else codecs.encode_raw
            own.payloads[form] = encode(agg, self.compression)
        return own.payloads[form]

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
        _, _, total_weight, n_kept = await asyncio.shield(own.result)
        reply = serialize.encode_message(PartReply(self._payload(own, "message"), total_weight, n_kept))
        rnd.bytes_sent += len(reply)
        return reply

    # ---- the direct path, owner's side ---------------------------------------------------------

    async def rpc_offer(self, peer_id: str, offer: direct.DirectOffer) -> direct.DirectAnswer:
        """A member will connect directly for a round, with this key; answer where (or nowhere)."""
        direct.check_offer(offer)
        if self.direct is None:
            return direct.DirectAnswer()
        self.direct.expect(offer.group_id, peer_id, offer.key)
        return self.direct.answer()

    async def _serve_direct(self, chan: direct.Channel, peer_id: str, group_id: bytes) -> None:
        """One member's parts for this peer over an authenticated connection; each reply goes out
        as soon as its part is aggregated. A bad frame ends the connection with an error."""
        try:
            rnd = await self._find_round(group_id)
        except RoundFailed as e:
            await chan.send_error(str(e), retry=False)
            return
        if peer_id not in rnd.group.members:
            await chan.send_error(f"{peer_id} is not a member of round {group_id.hex()[:8]}", retry=False)
            return
        expected = set(rnd.owned)
        replies: list[asyncio.Future] = []

        def limit(kind: int, part: int) -> int:
            return codecs.frame_bytes(self.compression, rnd.owned[part].size) if part in expected else 0

        def into(kind: int, part: int, length: int) -> memoryview | None:
            if kind != direct.PART or part not in expected:
                return None
            rnd.buffers.append(self._pool.take(length))
            return memoryview(rnd.buffers[-1])

        rnd.serving += 1
        try:
            while expected:
                async with asyncio.timeout(self.wait_for_round_s):   # a member that stalls is let go
                    frame, payload = await chan.recv(limit, into)
                if frame.kind != direct.PART or frame.part not in expected:
                    raise WireError(f"unexpected frame kind {frame.kind} for part {frame.part}")
                expected.discard(frame.part)
                own = rnd.owned[frame.part]
                if peer_id not in own.contribs:   # a repeat (over libp2p after a break) keeps the first
                    try:
                        t, reason = codecs.decode_raw(payload, self.compression, numel=own.size), None
                    except WireError as e:
                        t, reason = None, str(e)
                    if not own.result.done():
                        self._add(rnd, frame.part, peer_id, t, frame.weight, reason)
                replies.append(asyncio.ensure_future(self._reply_direct(chan, own, frame.part)))
            await first_failure(replies)
        except (IntegrityError, WireError) as e:
            log.info("direct connection from %s: %s", peer_id, e)
            await chan.send_error(str(e), retry=True)
        finally:
            for t in replies:
                t.cancel()
            await asyncio.gather(*replies, return_exceptions=True)
            rnd.bytes_sent += chan.bytes_sent
            rnd.bytes_received += chan.bytes_received
            rnd.serving -= 1
            self._release(rnd)

    def _release(self, rnd: _Round) -> None:
        """Pool the round's receive buffers once neither its run nor any connection can touch them."""
        if rnd.finished and rnd.serving == 0 and rnd.buffers:
            self._pool.give(rnd.buffers)
            rnd.buffers = []

    async def _reply_direct(self, chan: direct.Channel, own: _OwnedPart, part: int) -> None:
        try:
            _, _, total_weight, n_kept = await asyncio.shield(own.result)
        except RoundFailed as e:
            await chan.send_error(str(e), retry=False)
            return
        await chan.send(direct.REPLY, part=part, count=n_kept, weight=total_weight,
                        payload=self._payload(own, "raw"))

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
