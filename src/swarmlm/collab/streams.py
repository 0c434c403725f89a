"""Parts over libp2p streams: one stream per part, in libp2p's own encryption.

    streams = await StreamTransport.create(peer, rounds)
    left = await streams.exchange(rnd, owner, [3, 7])      # always [] : it carries everything or raises

A sender's `PartRequest` goes to the owner over a stream (`Peer.call_stream`: on p2pd that
moves several times more bytes per second than a unary call over the daemon's control
connection); the owner answers once the part is complete, with the same encoded aggregate for
every sender. A broken stream is asked again (the owner answers a repeat with the same result,
keeping the first contribution). At most `IN_FLIGHT` parts per round are in flight, taken in
the order the calls are made: the driver makes them in the global part order at every member,
so the lowest unfinished part is in flight at all its senders and no round deadlocks.
Every member serves this transport, whatever it sends by. Knows nothing of the side channel.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from swarmlm import serialize
from swarmlm.collab import compression as codecs
from swarmlm.collab.parts import Contribution
from swarmlm.collab.transport import Round, RoundTable, first_failure, round_failed
from swarmlm.errors import PeerError, PeerTimeout, RemoteError, WireError
from swarmlm.log import get_logger

log = get_logger(__name__)

PART_HANDLER = "swarmlm/collab/part/1"
MAX_REQUEST_BYTES = 16 * 1024 * 1024
IN_FLIGHT = 8                      # concurrent part calls per round
_RETRIES = 2                       # a broken stream is retried


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


async def call_part(peer: Any, owner: str, request: bytes, *, timeout_s: float) -> bytes:
    """Send one encoded `PartRequest` to the part's owner; its reply (an encoded `PartReply`)."""
    chunks = [c async for c in peer.call_stream(owner, PART_HANDLER, request, timeout_s=timeout_s,
                                                max_chunk_bytes=MAX_REQUEST_BYTES)]
    return b"".join(chunks)


class StreamTransport:
    """The libp2p transport: build with `await StreamTransport.create(peer, rounds)`."""

    def __init__(self, peer: Any, rounds: RoundTable):
        self.peer = peer
        self.rounds = rounds
        self._gates: dict[bytes, asyncio.Semaphore] = {}     # group ID -> its calls in flight

    @classmethod
    async def create(cls, peer: Any, rounds: RoundTable) -> StreamTransport:
        self = cls(peer, rounds)
        await peer.add_stream_handler(PART_HANDLER, self._serve_part, max_request_bytes=MAX_REQUEST_BYTES)
        return self

    def round_over(self, rnd: Round) -> None:
        self._gates.pop(rnd.group_id, None)

    async def close(self) -> None:
        pass                       # the handler goes with the peer

    # ---- sending -----------------------------------------------------------------------------------

    async def exchange(self, rnd: Round, owner: str, parts: list[int]) -> list[int]:
        await first_failure([self._exchange(rnd, owner, p) for p in parts])
        return []

    async def _exchange(self, rnd: Round, owner: str, part: int) -> None:
        deadline = rnd.deadline
        async with self._gates.setdefault(rnd.group_id, asyncio.Semaphore(IN_FLIGHT)):
            request = serialize.encode_message(PartRequest(rnd.group_id, part, rnd.weight,
                                                           rnd.encode(part, "message")))
            rnd.bytes_sent += len(request)
            left = max(0.01, deadline - time.monotonic())
            for attempt in range(_RETRIES + 1):
                try:
                    reply_bytes = await call_part(self.peer, owner, request, timeout_s=left)
                    break
                except RemoteError as e:          # the owner is up but its part failed
                    raise round_failed(str(e)) from None
                except PeerTimeout as e:
                    raise round_failed(str(e), {owner}) from None
                except PeerError as e:            # the owner vanished, or the stream broke: ask again
                    left = deadline - time.monotonic()
                    if attempt == _RETRIES or left <= 0:
                        raise round_failed(str(e), {owner}) from None
                    log.info("part %d to %s: %s; asking again", part, owner, e)
        rnd.bytes_received += len(reply_bytes)
        try:
            reply = serialize.decode_message(reply_bytes, PartReply, max_bytes=MAX_REQUEST_BYTES)
            values = codecs.decode(reply.payload, rnd.compression, numel=rnd.plan.size(part))
        except WireError as e:
            raise round_failed(f"{owner} answered part {part} with garbage: {e}", {owner}) from None
        rnd.deliver(part, values, reply.total_weight, owner)

    # ---- serving -----------------------------------------------------------------------------------

    async def _serve_part(self, peer_id: str, request: bytes) -> AsyncIterator[bytes]:
        yield await self.rpc_part(peer_id, request)

    async def rpc_part(self, peer_id: str, request: bytes) -> bytes:
        """One sender's contribution to a part this member owns; the aggregate once complete."""
        req = serialize.decode_message(request, PartRequest, max_bytes=MAX_REQUEST_BYTES)
        rnd = await self.rounds.find(req.group_id, peer_id)
        if req.part not in rnd.owned:
            raise WireError(f"part {req.part} is not owned by this peer")
        rnd.bytes_received += len(request)
        try:
            contribution = Contribution(codecs.decode(req.payload, rnd.compression, numel=rnd.plan.size(req.part)),
                                        req.weight)
        except WireError as e:
            contribution = Contribution(None, req.weight, str(e))
        rnd.contribute(req.part, peer_id, contribution)
        result = await rnd.result(req.part)
        reply = serialize.encode_message(PartReply(rnd.payload(req.part, "message"), result.total_weight,
                                                   result.n_kept))
        rnd.bytes_sent += len(reply)
        return reply
