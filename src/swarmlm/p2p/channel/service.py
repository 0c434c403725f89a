"""`SideChannel`: this peer's one listener for direct connections, and how it dials others.

    side = await SideChannel.create(peer, host="127.0.0.1")        # one per peer process (Peer.side_channel)
    await side.serve("store/blocks", handler, max_record_bytes=1 << 20)   # handler(conn): conn.peer_id is proven
    conn = await side.open(other_peer_id, "store/blocks", timeout_s=5, max_record_bytes=1 << 20)

Why: a libp2p stream crosses two unix sockets and two Go daemons each way; for bulk bytes
(blocks, averaging parts) and for latency-bound messages (decoding steps) one TCP connection
between the two processes costs a fraction of that. Blocks, inference steps and averaging
parts are three purposes of this one thing.

Trust:
- Opening: the dialer makes a fresh 32-byte key and sends it, with the purpose, in a libp2p
  call (`swarmlm/channel/1`: Noise-encrypted, authenticated to both peer IDs). The listener
  files it under its key ID with the caller's peer ID, for one connection within `KEY_TTL_S`.
  The connection opens with a magic and the key ID in the clear; the listener answers an
  accepted hello with an empty record, proving it holds the key. Records are conn.py's.
- Dialing: only to the addresses the target announced in its signed `Endpoint` record (from
  the DHT, or handed on in a message under the target's signature), filtered by policy.py; a
  target with no usable endpoint is `PeerError` and the caller falls back to libp2p.
- Listening: on this peer's host only (its `--host`), never on all interfaces unless asked.
Knows nothing of what the purposes carry.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from swarmlm.errors import IntegrityError, PeerError, PeerTimeout, WireError
from swarmlm.log import get_logger
from swarmlm.p2p import keys, rpc
from swarmlm.p2p.channel import policy
from swarmlm.p2p.channel.conn import KEY_BYTES, Connection, direction_keys
from swarmlm.p2p.records import open_record, record_type, seal

logger = get_logger(__name__)

OFFER_HANDLER = "swarmlm/channel/1"
KEY_ID_BYTES = 16
MAGIC = b"SLC1"
HELLO_TIMEOUT_S = 10.0        # an accepted connection that names no expected key in time is dropped
KEY_TTL_S = 60.0              # an expected key not used within this is forgotten
MAX_EXPECTED = 4096           # keys waiting for their connection; the oldest are forgotten first
MAX_KEYS_PER_PEER = 64        # of those, from one peer
MAX_PURPOSE_BYTES = 64
ENDPOINT_TTL_S = 600.0        # how long an announced endpoint lives in the DHT
ENDPOINT_REFRESH_S = 240.0    # re-announced this often
RESOLVED_TTL_S = 60.0         # a resolved endpoint is trusted this long before asking the DHT again

Handler = Callable[[Connection], Awaitable[None]]


@record_type("p2p.endpoint")
@dataclass(frozen=True)
class Endpoint:
    """Where a peer's side channel listens: multiaddrs `/ip4/A.B.C.D/tcp/P` (IP literals only)."""
    addrs: list[str]

    def check(self) -> None:
        if not 0 < len(self.addrs) <= policy.MAX_ADDRS:
            raise ValueError(f"an endpoint lists 1 to {policy.MAX_ADDRS} addresses")
        for a in self.addrs:
            policy.parse_addr(a)


@dataclass(frozen=True)
class ChannelOffer:
    purpose: str                  # a purpose the listener serves
    key: bytes                    # KEY_BYTES fresh random bytes: the dialer and the listener alone know them


@dataclass(frozen=True)
class ChannelAccept:
    max_record_bytes: int         # the largest record the listener accepts on this connection


def key_id(key: bytes) -> bytes:
    """The public name of a connection key: it says nothing about the key."""
    return hmac.digest(key, b"swarmlm side channel key id", hashlib.sha256)[:KEY_ID_BYTES]


@dataclass
class _Purpose:
    handler: Handler
    max_record_bytes: int


@dataclass
class _Expected:
    key: bytes
    peer_id: str
    purpose: str
    expires: float


class SideChannel:
    """Build with `await SideChannel.create(peer, host=...)`; close with `await side.close()`."""

    def __init__(self, peer: Any, *, host: str, clock: Callable[[], float]):
        self.peer = peer
        self.host = host
        self.port = 0
        self.clock = clock
        self._purposes: dict[str, _Purpose] = {}
        self._expected: OrderedDict[bytes, _Expected] = OrderedDict()
        self._resolved: dict[str, tuple[list[str], float]] = {}     # peer -> (addrs, trusted until)
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._conns: set[Connection] = set()                    # accepted, being served
        self._dialed: weakref.WeakSet[Connection] = weakref.WeakSet()   # opened by this peer
        self._announcing: asyncio.Task | None = None
        self._listening: asyncio.Future | None = None
        self._announce = True
        self.refused = 0              # connections dropped for a bad hello (tests, logs)
        self.accepted = 0

    @classmethod
    async def create(cls, peer: Any, *, host: str = "127.0.0.1", announce: bool = True,
                     clock: Callable[[], float] = time.monotonic) -> SideChannel:
        """A side channel of `peer` that listens on `host` (an IP literal) once it serves a purpose,
        and (with `announce`) keeps this peer's endpoint in the DHT from then on. A peer that only
        dials never listens."""
        policy.format_addr(host, 1)                                  # an IP literal, or ValueError
        self = cls(peer, host=host, clock=clock)
        self._announce = announce
        return self

    async def _listen(self) -> None:
        await self.peer.add_handler(OFFER_HANDLER, rpc.message_handler(ChannelOffer, self.rpc_offer,
                                                                       max_request_bytes=256), max_request_bytes=256)
        self._server = await asyncio.get_running_loop().create_server(self._accepted, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        if self._announce:
            await self.announce()
            self._announcing = asyncio.ensure_future(self._announce_forever())
        logger.debug("side channel of %s on %s:%d", self.peer.peer_id, self.host, self.port)

    @property
    def addrs(self) -> list[str]:
        """What this peer announces: its host, or (listening on all interfaces, as asked with
        `--host 0.0.0.0`) the IP literals of its libp2p multiaddrs."""
        if not policy.is_unspecified(self.host):
            return [policy.format_addr(self.host, self.port)]
        hosts = [h for h in policy.maddr_hosts(self.peer.maddrs) if not policy.is_unspecified(h)]
        return [policy.format_addr(h, self.port) for h in hosts[:policy.MAX_ADDRS]]

    async def serve(self, purpose: str, handler: Handler, *, max_record_bytes: int) -> None:
        """Hand each connection opened for `purpose` to `handler`; records above `max_record_bytes` are
        refused. The first purpose starts the listener."""
        if not 0 < len(purpose.encode()) <= MAX_PURPOSE_BYTES or purpose in self._purposes:
            raise ValueError(f"bad or taken side-channel purpose {purpose!r}")
        self._purposes[purpose] = _Purpose(handler, max_record_bytes)
        if self._listening is None:
            self._listening = asyncio.ensure_future(self._listen())
        try:
            await asyncio.shield(self._listening)
        except BaseException:
            del self._purposes[purpose]
            if self._listening.done():
                self._listening = None
            raise

    # ---- the endpoint in the DHT -------------------------------------------------------------------

    def sealed_endpoint(self) -> bytes | None:
        """This peer's endpoint record, signed: what a message may carry so its reader need not ask the
        DHT (None while it listens for nothing)."""
        if not self.port or not self.addrs:
            return None
        return seal(self.peer.identity, keys.endpoint_key(self.peer.peer_id), Endpoint(self.addrs),
                    expires_at=time.time() + ENDPOINT_TTL_S, subkey=keys.peer_subkey(self.peer.peer_id))

    async def announce(self) -> None:
        if not self.addrs:
            logger.warning("the side channel listens on %s, but this peer has no IP address to announce: "
                           "others reach it over libp2p only", self.host)
            return
        await self.peer.store(keys.endpoint_key(self.peer.peer_id), Endpoint(self.addrs), ttl_s=ENDPOINT_TTL_S,
                              subkey=keys.peer_subkey(self.peer.peer_id))

    async def _announce_forever(self) -> None:
        while True:
            await asyncio.sleep(ENDPOINT_REFRESH_S)
            try:
                await self.announce()
            except Exception as e:                      # the DHT may be briefly unreachable
                logger.info("announcing the side channel failed: %s", e)

    def learn(self, peer_id: str, sealed: bytes) -> list[str]:
        """Take `peer_id`'s endpoint from a sealed record carried in a message; `IntegrityError` or
        `WireError` unless it is that peer's own, signed and unexpired."""
        record = open_record(sealed, key=keys.endpoint_key(peer_id), subkey=keys.peer_subkey(peer_id))
        if record.signer != peer_id or record.expires_at <= time.time():
            raise IntegrityError(f"the endpoint record is not {peer_id}'s own, or it expired")
        self._resolved[peer_id] = (list(record.value.addrs), self.clock() + RESOLVED_TTL_S)
        return list(record.value.addrs)

    async def resolve(self, peer_id: str) -> list[tuple[str, int]]:
        """Where `peer_id` may be dialed: its own announced addresses that policy allows ([] if none)."""
        cached = self._resolved.get(peer_id)
        if cached is None or cached[1] < self.clock():
            found = await self.peer.get(keys.endpoint_key(peer_id), latest=True)
            mine = [r for r in found if r.signer == peer_id and isinstance(r.value, Endpoint)]
            cached = (list(mine[0].value.addrs) if mine else [], self.clock() + (RESOLVED_TTL_S if mine else 5.0))
            self._resolved[peer_id] = cached
        return policy.dialable(cached[0], local_host=self.host)

    # ---- listening ---------------------------------------------------------------------------------

    async def rpc_offer(self, peer_id: str, offer: ChannelOffer) -> ChannelAccept:
        """File a dialer's key for one connection."""
        purpose = self._purposes.get(offer.purpose) if isinstance(offer.purpose, str) else None
        if purpose is None:
            raise WireError(f"no side-channel purpose {offer.purpose!r} here")
        if not isinstance(offer.key, bytes) or len(offer.key) != KEY_BYTES:
            raise WireError(f"a side-channel key has {KEY_BYTES} bytes")
        now = self.clock()
        while self._expected and (len(self._expected) >= MAX_EXPECTED or next(iter(self._expected.values())).expires < now):
            self._expected.popitem(last=False)
        if sum(e.peer_id == peer_id for e in self._expected.values()) >= MAX_KEYS_PER_PEER:
            raise WireError(f"{MAX_KEYS_PER_PEER} side-channel keys of yours are already waiting")
        self._expected[key_id(offer.key)] = _Expected(offer.key, peer_id, offer.purpose, now + KEY_TTL_S)
        return ChannelAccept(max_record_bytes=purpose.max_record_bytes)

    def _accepted(self) -> Connection:
        conn = Connection()
        task = asyncio.ensure_future(self._serve(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return conn

    async def _serve(self, conn: Connection) -> None:
        self._conns.add(conn)
        try:
            purpose = await self._hello(conn)
            if purpose is not None:
                self.accepted += 1
                await purpose.handler(conn)
        except asyncio.CancelledError:
            pass                    # closing: asyncio would log a cancelled connection task as an error
        except (ConnectionError, OSError, asyncio.IncompleteReadError, PeerError) as e:
            logger.debug("side-channel connection from %s ended: %s", conn.peer_id or "?", e)
        except Exception as e:      # never let one connection take the listener down
            logger.warning("side-channel handler for %s failed", conn.purpose, exc_info=e)
        finally:
            self._conns.discard(conn)
            conn.close()

    async def _hello(self, conn: Connection) -> _Purpose | None:
        try:
            hello = await rpc.within(conn.read_raw(len(MAGIC) + KEY_ID_BYTES), HELLO_TIMEOUT_S)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
            return self._refuse(conn, f"no hello ({type(e).__name__})")
        if bytes(hello[:len(MAGIC)]) != MAGIC:
            return self._refuse(conn, "not a side-channel connection")
        expected = self._expected.pop(bytes(hello[len(MAGIC):]), None)
        if expected is None:
            return self._refuse(conn, "unknown or used key")
        if expected.expires < self.clock():
            return self._refuse(conn, "expired key")
        purpose = self._purposes.get(expected.purpose)
        if purpose is None:
            return self._refuse(conn, "purpose no longer served")
        to_us, to_them = direction_keys(expected.key, dialer=expected.peer_id, listener=self.peer.peer_id,
                                        purpose=expected.purpose)
        conn.start(to_them, to_us, peer_id=expected.peer_id, purpose=expected.purpose,
                   max_record_bytes=purpose.max_record_bytes)
        conn.write(b"")                     # welcome: proves we hold the key
        return purpose

    def _refuse(self, conn: Connection, why: str) -> None:
        self.refused += 1
        logger.info("side-channel connection from %s refused: %s", conn.get_extra_info("peername"), why)
        return None

    # ---- dialing -----------------------------------------------------------------------------------

    async def open(self, peer_id: str, purpose: str, *, timeout_s: float, max_record_bytes: int,
                   endpoint: bytes | None = None) -> Connection:
        """An encrypted connection to `peer_id` for `purpose`; `PeerError` if it cannot be made (the
        caller falls back to libp2p). `endpoint`: the target's sealed record, from a message."""
        if endpoint is not None:
            try:
                self.learn(peer_id, endpoint)
            except (IntegrityError, WireError) as e:
                raise EndpointRefused(f"refusing to dial {peer_id}: {e}") from None
        addrs = await self.resolve(peer_id)
        if not addrs:
            raise PeerError(f"{peer_id} announces no side-channel address this peer may dial")
        key = os.urandom(KEY_BYTES)
        accept = await rpc.call_message(self.peer, peer_id, OFFER_HANDLER, ChannelOffer(purpose, key), ChannelAccept,
                                        timeout_s=timeout_s, max_response_bytes=256)
        errors = []
        for host, port in addrs:
            try:
                return await self._dial(host, port, peer_id, purpose, key, timeout_s=timeout_s,
                                        max_record_bytes=max_record_bytes)
            except PeerError as e:
                errors.append(str(e))
                if not isinstance(e, _Unreachable):
                    break                    # it answered, but not as the peer that holds our key
        raise PeerError(f"no side channel to {peer_id} ({purpose}): " + "; ".join(errors))

    async def _dial(self, host: str, port: int, peer_id: str, purpose: str, key: bytes, *, timeout_s: float,
                    max_record_bytes: int) -> Connection:
        where = f"side channel {host}:{port}"
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(Connection, host, port), timeout_s)
        except asyncio.TimeoutError:
            raise _Unreachable(f"{where}: no connection in {timeout_s:.1f} s") from None
        except OSError as e:
            raise _Unreachable(f"{where}: {e}") from None
        to_them, to_us = direction_keys(key, dialer=self.peer.peer_id, listener=peer_id, purpose=purpose)
        conn.start(to_them, to_us, peer_id=peer_id, purpose=purpose, max_record_bytes=max_record_bytes)
        try:
            self._dialed.add(conn)
            conn.write_raw(MAGIC + key_id(key))
            if await rpc.within(conn.read_record(), timeout_s):
                raise PeerError("unexpected welcome")
        except asyncio.TimeoutError:
            conn.close()
            raise PeerTimeout(f"{where}: no welcome in {timeout_s:.1f} s") from None
        except (ConnectionError, OSError, asyncio.IncompleteReadError, PeerError) as e:
            conn.close()
            raise PeerError(f"{where}: refused ({type(e).__name__}: {e})") from None
        except BaseException:
            conn.close()
            raise
        return conn

    # ---- closing -----------------------------------------------------------------------------------

    def abort(self) -> None:
        """Stop listening and cut every connection, accepted or dialed, at once (a dying peer: nothing awaited)."""
        if self._announcing is not None:
            self._announcing.cancel()
        if self._server is not None:
            self._server.close()
        for conn in [*self._conns, *self._dialed]:
            conn.abort()
        for task in list(self._tasks):
            task.cancel()

    async def close(self) -> None:
        self.abort()
        await asyncio.gather(*self._tasks, *( [self._announcing] if self._announcing else []), return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5.0)


class EndpointRefused(PeerError):
    """The endpoint record a message carried for a peer is not that peer's own (or not valid): nothing was dialed."""


class _Unreachable(PeerError):
    """No TCP connection at that address: the next announced one may do."""



def start_once(started: asyncio.Future | None, peer: Any) -> asyncio.Future:
    """`peer`'s side channel as a future: the one already started, or a new start if none (or it failed)."""
    if started is None or (started.done() and (started.cancelled() or started.exception() is not None)):
        return asyncio.ensure_future(SideChannel.create(peer, host=peer.host))
    return started


async def close_started(started: asyncio.Future | None) -> None:
    """Close the side channel `start_once` started, whatever state its start is in."""
    if started is None:
        return
    if not started.done():
        started.cancel()
    with contextlib.suppress(BaseException):
        await started
    if not started.cancelled() and started.exception() is None:
        await started.result().close()
