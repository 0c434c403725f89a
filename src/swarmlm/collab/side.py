"""Parts over the peer's side channel: one encrypted connection per pair of members and round.

    side = await SideTransport.create(peer, rounds, max_part_elems=MAX_PART_ELEMS)
    left = await side.exchange(rnd, owner, parts)      # the parts it could not carry (libp2p takes them)

Why: a libp2p stream crosses two unix sockets and two Go daemons each way; the side channel
(p2p/channel/) is one TCP connection between the two processes, and moves the same parts
several times faster. It also owns the trust: the dialer's one-use key travels over libp2p,
the address dialed is the one the owner announced itself, and every record is AES-256-GCM
encrypted and authenticated, in order (an altered, replayed, reordered or cut record ends the
connection). `conn.peer_id` is the dialer, proven by the key exchange.

Records on one connection, each an AEAD record of the side channel:

    sender -> owner   the round's group ID (16 bytes): the owner checks the sender is a member
                      then per part: header (PART, part, 0, weight, length), the payload
    owner -> sender   per part, once aggregated: header (REPLY, part, n_kept, total_weight,
                      length), the aggregate; or header (ERROR, 0, RETRY | FATAL, 0, length), a message

Headers are read into a buffer of their exact size and payloads into one of the part's exact
size (a pooled buffer at the owner; at the sender, for float32, the result vector itself), so
no record's length is trusted before it is bounded. A connection that cannot open, breaks,
fails a record, or ends with ERROR RETRY leaves its unanswered parts to the next transport;
ERROR FATAL (the round is over at the owner, or the sender is no member) fails the round.
Knows nothing of sockets, keys or addresses: those are the side channel's.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from swarmlm import serialize
from swarmlm.collab import compression as codecs
from swarmlm.collab.parts import MAX_PART_ELEMS, Contribution
from swarmlm.collab.transport import Round, RoundTable, first_failure, round_failed
from swarmlm.errors import PeerError, RoundFailed, WireError
from swarmlm.log import get_logger
from swarmlm.p2p import rpc

log = get_logger(__name__)

PURPOSE = "collab/parts"
GROUP_ID_BYTES = 16
MAX_ERROR_BYTES = 4096
CONNECT_TIMEOUT_S = 2.0            # an owner not reachable directly within this is reached over libp2p
HELLO_TIMEOUT_S = 10.0             # a connection must name its round within this
POOL_BYTES = 256 << 20             # receive buffers kept between rounds

PART, REPLY, ERROR = 1, 2, 3       # header kinds
RETRY, FATAL = 1, 0                # ERROR's count: may the sender carry the rest over libp2p?
HEADER = struct.Struct("<B3xIIdQ")  # kind | part | count | weight | payload length


class BufferPool:
    """Receive buffers kept from one round to the next, up to `max_bytes`: decrypting into memory
    the kernel has already mapped costs a fraction of writing fresh pages. The caller gives a
    buffer back only once nothing can read or write it any more."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._free: dict[int, list[bytearray]] = {}
        self._bytes = 0

    def take(self, n: int) -> bytearray:
        free = self._free.get(n)
        if free:
            self._bytes -= n
            return free.pop()
        return bytearray(n)

    def give(self, buffers: list[bytearray]) -> None:
        for buf in buffers:
            if self._bytes + len(buf) <= self.max_bytes:
                self._free.setdefault(len(buf), []).append(buf)
                self._bytes += len(buf)


@dataclass
class _Held:
    """What the owner's side keeps for one round: its pooled buffers, and the connections using them."""
    buffers: list[bytearray] = field(default_factory=list)
    serving: int = 0
    over: bool = False


async def _read_header(conn: Any) -> tuple[int, int, int, float, int]:
    buf = bytearray(HEADER.size)
    if await conn.read_record_into(buf) != HEADER.size:
        raise WireError("a short part header")
    kind, part, count, weight, length = HEADER.unpack(buf)
    if kind not in (PART, REPLY, ERROR):
        raise WireError(f"a part header of kind {kind}")
    return kind, part, count, weight, length


def _send_error(conn: Any, message: str, *, retry: bool) -> None:
    """Best effort: tell the other side why this connection ends (sent before the close)."""
    data = message.encode("utf-8", "replace")[:MAX_ERROR_BYTES]
    with contextlib.suppress(ConnectionError, OSError):
        conn.write(HEADER.pack(ERROR, 0, RETRY if retry else FATAL, 0.0, len(data)))
        conn.write(data)


class SideTransport:
    """The side-channel transport: build with `await SideTransport.create(peer, rounds)`."""

    def __init__(self, side: Any, rounds: RoundTable, *, max_part_elems: int):
        self.side = side
        self.rounds = rounds
        # the largest record either way: a float32 part, or an error message
        self.max_record_bytes = max(codecs.frame_bytes("none", max_part_elems), MAX_ERROR_BYTES)
        self._pool = BufferPool(POOL_BYTES)
        self._held: dict[bytes, _Held] = {}
        self._conns: set[Any] = set()
        self._closed = False

    @classmethod
    async def create(cls, peer: Any, rounds: RoundTable, *, max_part_elems: int = MAX_PART_ELEMS) -> SideTransport:
        side = await peer.side_channel()
        self = cls(side, rounds, max_part_elems=max_part_elems)
        await side.serve(PURPOSE, self._serve, max_record_bytes=self.max_record_bytes)
        return self

    async def close(self) -> None:
        """Serve and open no more connections, and cut those open (their parts go over libp2p)."""
        self._closed = True
        for conn in list(self._conns):
            conn.abort()

    # ---- sending -----------------------------------------------------------------------------------

    async def exchange(self, rnd: Round, owner: str, parts: list[int]) -> list[int]:
        """Send `parts` to `owner` over one connection and read the aggregates back; the parts still
        unanswered when the connection cannot open or breaks."""
        if self._closed:
            return parts
        try:
            conn = await self.side.open(owner, PURPOSE, max_record_bytes=self.max_record_bytes,
                                        timeout_s=min(CONNECT_TIMEOUT_S, max(0.01, rnd.deadline - time.monotonic())))
        except (PeerError, OSError) as e:
            log.debug("no side channel to %s: %s", owner, e)
            return parts
        pending = set(parts)
        self._conns.add(conn)
        try:
            conn.write(rnd.group_id)
            await first_failure([self._send_all(conn, rnd, parts), self._receive_all(conn, rnd, owner, pending)])
        except (ConnectionError, OSError, asyncio.IncompleteReadError, PeerError, WireError) as e:
            log.info("side channel to %s broke (%s); %d parts go over libp2p", owner, e, len(pending))
        finally:
            self._conns.discard(conn)
            rnd.bytes_sent += conn.bytes_sent
            rnd.bytes_received += conn.bytes_received
            conn.close()
        return sorted(pending)

    @staticmethod
    async def _send_all(conn: Any, rnd: Round, parts: list[int]) -> None:
        for p in parts:
            payload = rnd.encode(p, "raw")
            conn.write(HEADER.pack(PART, p, 0, rnd.weight, len(payload)))
            conn.write(payload)
            await conn.drain()

    @staticmethod
    async def _receive_all(conn: Any, rnd: Round, owner: str, pending: set[int]) -> None:
        while pending:
            kind, part, count, weight, length = await _read_header(conn)
            if kind == ERROR:
                message = bytearray(MAX_ERROR_BYTES)
                n = await conn.read_record_into(message)
                message = f"{owner}: {message[:n].decode('utf-8', 'replace')}"
                if count == RETRY:
                    raise ConnectionError(message)
                raise round_failed(message)
            if kind != REPLY or part not in pending:
                raise round_failed(f"{owner} sent a header of kind {kind} for part {part}", {owner})
            expected = codecs.frame_bytes(rnd.compression, rnd.plan.size(part))
            if length != expected:
                raise round_failed(f"{owner} answered part {part} with {length} bytes, not {expected}", {owner})
            # float32 replies are decrypted into the result itself; a record that then fails leaves
            # the part pending, and the next transport writes it again
            target = serialize.tensor_to_raw(rnd.assembly.slot(part)) if rnd.compression == "none" \
                else bytearray(expected)
            if await conn.read_record_into(target) != expected:
                raise round_failed(f"{owner} answered part {part} with a short record", {owner})
            try:
                values = codecs.decode_raw(target, rnd.compression, numel=rnd.plan.size(part))
            except WireError as e:
                raise round_failed(f"{owner} answered part {part} with garbage: {e}", {owner}) from None
            rnd.deliver(part, values, weight, owner)
            pending.discard(part)

    # ---- serving (the owner's side) ---------------------------------------------------------------

    async def _serve(self, conn: Any) -> None:
        """One member's parts for this peer; each reply goes out as soon as its part is aggregated."""
        if self._closed:
            return
        hello = bytearray(GROUP_ID_BYTES)
        try:
            if await rpc.within(conn.read_record_into(hello), HELLO_TIMEOUT_S) != GROUP_ID_BYTES:
                raise WireError("a connection must first name its round (16 bytes)")
            rnd = await self.rounds.find(bytes(hello), conn.peer_id)
        except (RoundFailed, WireError) as e:
            log.info("side-channel parts from %s refused: %s", conn.peer_id, e)
            _send_error(conn, str(e), retry=False)
            return
        held = self._held.setdefault(rnd.group_id, _Held())
        held.serving += 1
        self._conns.add(conn)
        replies: list[asyncio.Future] = []
        draining = asyncio.Lock()             # one drain at a time: the connection wakes one waiter
        try:
            expected = set(rnd.owned)
            while expected:
                kind, part, _, weight, length = await rpc.within(_read_header(conn), self.rounds.wait_for_round_s)
                if kind != PART or part not in expected:
                    raise WireError(f"unexpected header kind {kind} for part {part}")
                if length > codecs.frame_bytes(rnd.compression, rnd.plan.size(part)):
                    raise WireError(f"{length} bytes for part {part}")
                held.buffers.append(self._pool.take(length))
                buf = held.buffers[-1]
                if await rpc.within(conn.read_record_into(buf), self.rounds.wait_for_round_s) != length:
                    raise WireError(f"part {part}: a record shorter than its header says")
                expected.discard(part)
                try:
                    contribution = Contribution(codecs.decode_raw(buf, rnd.compression, numel=rnd.plan.size(part)),
                                                weight)
                except WireError as e:
                    contribution = Contribution(None, weight, str(e))
                rnd.contribute(part, conn.peer_id, contribution)
                replies.append(asyncio.ensure_future(self._reply(conn, rnd, part, draining)))
            await first_failure(replies)
        except (PeerError, WireError) as e:
            log.info("side-channel parts from %s: %s", conn.peer_id, e)
            _send_error(conn, str(e), retry=True)
        except asyncio.TimeoutError:
            log.info("side-channel parts from %s: nothing for %.0f s", conn.peer_id, self.rounds.wait_for_round_s)
        finally:
            for t in replies:
                t.cancel()
            await asyncio.gather(*replies, return_exceptions=True)
            self._conns.discard(conn)
            rnd.bytes_sent += conn.bytes_sent
            rnd.bytes_received += conn.bytes_received
            held.serving -= 1
            self._release(rnd.group_id)

    @staticmethod
    async def _reply(conn: Any, rnd: Round, part: int, draining: asyncio.Lock) -> None:
        try:
            result = await rnd.result(part)
        except RoundFailed as e:
            _send_error(conn, str(e), retry=False)
            return
        payload = rnd.payload(part, "raw")
        conn.write(HEADER.pack(REPLY, part, result.n_kept, result.total_weight, len(payload)))
        conn.write(payload)
        async with draining:
            await conn.drain()

    def round_over(self, rnd: Round) -> None:
        held = self._held.get(rnd.group_id)
        if held is not None:
            held.over = True
            self._release(rnd.group_id)

    def _release(self, group_id: bytes) -> None:
        """Pool a round's buffers once neither its run nor any connection can touch them."""
        held = self._held.get(group_id)
        if held is not None and held.over and held.serving == 0:
            self._pool.give(held.buffers)
            del self._held[group_id]
