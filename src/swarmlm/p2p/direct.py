"""Direct TCP connections between two peers, offered over libp2p, for bulk bytes.

    listener = await DirectListener.start(host, handler)      # handler(peer_id, reader, writer)
    offer = listener.offer(caller_peer_id)                    # send it to the caller over libp2p
    reader, writer = await connect(offer, my_peer_id, timeout_s=10)

A libp2p stream on p2pd crosses two unix sockets and two Go daemons: on a 2-core machine it
moves about 0.45 GB/s at best and its daemons take most of the CPU, where loopback TCP moves
several GB/s. For bytes whose integrity is checked by other means — content-addressed blocks,
each verified against its CID — a peer can offer a plain TCP connection instead: the offer
travels inside an authenticated libp2p call, and holds a ticket, HMAC-SHA256 over the
caller's peer ID and an expiry under a secret only the listener knows. The caller presents
the ticket as the connection's first frame; the listener checks it before reading anything
else, so every direct connection speaks for a libp2p-authenticated peer and the listener
keeps no state per offer. The bytes themselves are not encrypted or authenticated: never use
this for data that is secret or that is not verified end to end. A caller that cannot dial
the offered address (NAT, firewall) falls back to libp2p streams.

Frames are `rpc.py`'s (tag, length, payload), with the same size checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import struct
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from swarmlm import serialize
from swarmlm.errors import PeerError, PeerTimeout, WireError
from swarmlm.log import get_logger
from swarmlm.p2p import rpc

logger = get_logger(__name__)

TICKET_TTL_S = 300.0           # an offer may be used for this long
MAX_TICKET_BYTES = 512
HELLO_TIMEOUT_S = 10.0         # a connection that sends no valid ticket in time is dropped
READ_BUFFER = 256 << 10    # asyncio's 64 KiB default pauses the socket several times per 256 KiB block

DirectHandler = Callable[[str, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass(frozen=True)
class Offer:
    """Where and how to dial a peer directly; sent inside a libp2p reply."""
    host: str          # an IP address of the listener
    port: int          # 1..65535
    expires: float     # unix time after which the ticket is refused
    ticket: bytes      # HMAC-SHA256(secret, peer_id | expires): 32 bytes


@dataclass(frozen=True)
class Hello:
    """The caller's first frame on a direct connection."""
    peer_id: str       # the libp2p peer the offer was made to
    expires: float
    ticket: bytes


def check_offer(offer: Offer) -> Offer:
    """`WireError` unless `offer` is well formed (a peer's reply is not trusted)."""
    if not isinstance(offer.host, str) or not 0 < len(offer.host) <= 64:
        raise WireError("direct offer: bad host")
    if not isinstance(offer.port, int) or not 0 < offer.port < 65536:
        raise WireError(f"direct offer: bad port {offer.port!r}")
    if not isinstance(offer.ticket, bytes) or len(offer.ticket) != 32:
        raise WireError("direct offer: the ticket must be 32 bytes")
    return offer


def maddr_hosts(maddrs: list[str]) -> list[str]:
    """The IP addresses in multiaddrs like /ip4/10.0.0.5/tcp/4001/p2p/Qm..., in order, once each:
    where a peer may listen for direct connections."""
    hosts: list[str] = []
    for m in maddrs:
        parts = str(m).split("/")
        if len(parts) > 2 and parts[1] in ("ip4", "ip6") and parts[2] not in hosts:
            hosts.append(parts[2])
    return hosts


class DirectListener:
    """A TCP listener that serves only holders of its own tickets."""

    def __init__(self, server: asyncio.base_events.Server, host: str, handler: DirectHandler):
        self._server = server
        self.host = host
        self.port = server.sockets[0].getsockname()[1]
        self._handler = handler
        self._secret = os.urandom(32)
        self._tasks: set[asyncio.Task] = set()
        self.refused = 0               # connections dropped for a bad hello (tests, logs)

    @classmethod
    async def start(cls, host: str, handler: DirectHandler, *, port: int = 0) -> DirectListener:
        listener: DirectListener | None = None

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            listener._tasks.add(task)
            try:
                await listener._serve(reader, writer)
            except asyncio.CancelledError:
                pass        # closing: asyncio would log a cancelled connection task as an error
            finally:
                listener._tasks.discard(task)

        server = await asyncio.start_server(accept, host, port, limit=READ_BUFFER)
        listener = cls(server, host, handler)
        logger.debug("direct listener on %s:%d", host, listener.port)
        return listener

    def offer(self, peer_id: str, *, ttl_s: float = TICKET_TTL_S) -> Offer:
        expires = round(time.time() + ttl_s, 3)
        return Offer(host=self.host, port=self.port, expires=expires, ticket=self._ticket(peer_id, expires))

    def _ticket(self, peer_id: str, expires: float) -> bytes:
        return hmac.digest(self._secret, struct.pack(">d", expires) + peer_id.encode(), hashlib.sha256)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                tag, payload = await asyncio.wait_for(rpc.read_frame(reader, max_bytes=MAX_TICKET_BYTES),
                                                      HELLO_TIMEOUT_S)
                if tag != rpc.REQUEST:
                    raise WireError(f"expected a hello frame, got tag {tag}")
                hello = serialize.decode_message(payload, Hello, max_bytes=MAX_TICKET_BYTES)
                if not isinstance(hello.ticket, bytes) or not isinstance(hello.peer_id, str):
                    raise WireError("malformed hello")
                if not hmac.compare_digest(hello.ticket, self._ticket(hello.peer_id, hello.expires)):
                    raise WireError("invalid ticket")
                if hello.expires < time.time():
                    raise WireError("expired ticket")
            except (WireError, PeerError, asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError) as e:
                self.refused += 1
                logger.info("direct connection from %s refused: %s", writer.get_extra_info("peername"),
                            e or type(e).__name__)
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await rpc.write_frame(writer, rpc.ERROR, f"refused: {e or type(e).__name__}".encode())
                return
            await rpc.write_frame(writer, rpc.DATA)          # welcome
            await self._handler(hello.peer_id, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError) as e:
            logger.debug("direct connection closed: %s", e)
        finally:
            writer.close()

    async def close(self) -> None:
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._server.wait_closed()


class DirectStream(asyncio.BufferedProtocol):
    """The dialing side of a direct connection: the reader and the writer in one object, with
    the `readexactly` / `write` / `drain` / `close` that rpc.py's framing uses.

    A large `readexactly(n)` hands the kernel a buffer of exactly n bytes to receive into, so a
    256 KiB block is copied once (socket to its own bytearray) instead of three times (a new
    bytes per recv, the StreamReader's buffer, the slice handed out)."""

    def __init__(self, *, max_buffered: int = READ_BUFFER):
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._scratch = bytearray(64 * 1024)
        self._pending = bytearray()            # received while nobody waits for it
        self._target: bytearray | None = None  # the buffer of the readexactly in progress
        self._filled = 0
        self._waiter: asyncio.Future | None = None
        self._eof = False
        self._error: BaseException | None = None
        self._max_buffered = max_buffered
        self._paused_reading = False
        self._drain_waiter: asyncio.Future | None = None
        self._paused_writing = False

    # ---- protocol callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._target is not None:
            return memoryview(self._target)[self._filled:]
        return memoryview(self._scratch)

    def buffer_updated(self, nbytes: int) -> None:
        if self._target is not None:
            self._filled += nbytes
            if self._filled == len(self._target):
                self._wake()
            return
        self._pending += memoryview(self._scratch)[:nbytes]
        if len(self._pending) > self._max_buffered and not self._paused_reading:
            self._paused_reading = True
            self._transport.pause_reading()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._error = exc
        self._wake()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_exception(exc or ConnectionResetError("connection lost"))

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # ---- the reader ----------------------------------------------------------------------------

    async def readexactly(self, n: int) -> bytes | bytearray:
        """n bytes; `asyncio.IncompleteReadError` if the connection ends first."""
        if len(self._pending) >= n:
            data = bytes(self._pending[:n])
            del self._pending[:n]
            return data
        target = bytearray(n)
        have = len(self._pending)
        target[:have] = self._pending
        self._pending.clear()
        self._target, self._filled = target, have
        if self._paused_reading:
            self._paused_reading = False
            self._transport.resume_reading()
        try:
            while self._filled < n:
                if self._eof:
                    if self._error is not None and not isinstance(self._error, ConnectionError):
                        raise ConnectionResetError(str(self._error))
                    raise asyncio.IncompleteReadError(bytes(target[:self._filled]), n)
                self._waiter = self._loop.create_future()
                await self._waiter
        finally:
            self._target, self._waiter = None, None
        return target

    # ---- the writer ----------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._transport.write(data)

    async def drain(self) -> None:
        if self._eof and self._error is not None:
            raise ConnectionResetError(str(self._error))
        if self._paused_writing:
            self._drain_waiter = self._loop.create_future()
            await self._drain_waiter

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def is_closing(self) -> bool:
        return self._transport is None or self._transport.is_closing()


async def connect(offer: Offer, peer_id: str, *, timeout_s: float) -> tuple[DirectStream, DirectStream]:
    """Dial an offer as `peer_id`; `PeerError` if it cannot be reached or refuses the ticket.
    Returns (reader, writer) for rpc.py's framing (one `DirectStream` twice)."""
    check_offer(offer)
    try:
        _, stream = await asyncio.wait_for(
            asyncio.get_running_loop().create_connection(DirectStream, offer.host, offer.port), timeout_s)
        reader = writer = stream
    except asyncio.TimeoutError:
        raise PeerTimeout(f"direct {offer.host}:{offer.port}: no connection in {timeout_s:.1f} s") from None
    except OSError as e:
        raise PeerError(f"direct {offer.host}:{offer.port}: {e}") from None
    try:
        hello = serialize.encode_message(Hello(peer_id=peer_id, expires=offer.expires, ticket=offer.ticket))
        await rpc.write_frame(writer, rpc.REQUEST, hello)
        tag, payload = await asyncio.wait_for(rpc.read_frame(reader, max_bytes=0), timeout_s)
        if tag != rpc.DATA:
            raise PeerError(f"direct {offer.host}:{offer.port}: {payload.decode('utf-8', 'replace')}")
    except asyncio.TimeoutError:
        writer.close()
        raise PeerTimeout(f"direct {offer.host}:{offer.port}: no welcome in {timeout_s:.1f} s") from None
    except (ConnectionError, asyncio.IncompleteReadError) as e:
        writer.close()
        raise PeerError(f"direct {offer.host}:{offer.port}: {e}") from None
    except BaseException:
        writer.close()
        raise
    return reader, writer
