"""The direct path of an averaging round: member-to-member TCP with authenticated frames.

    listener = await DirectListener.create("127.0.0.1", serve)      # serve(channel, peer_id, group_id)
    offer = DirectOffer(group_id, new_key())                          # sent over libp2p (encrypted,
    answer = ...                                                      #   authenticated to the peer ID)
    chan = await connect(answer, offer.key, group_id, my_peer_id, timeout_s=2)
    await chan.send(PART, part=3, weight=8.0, payload=raw)
    frame, payload = await chan.recv(limit=lambda kind, part: n_bytes)

Why: through libp2p every byte goes Python -> unix socket -> p2pd -> TCP -> p2pd -> unix
socket -> Python, with the daemons competing for the same cores; a direct TCP connection
moves the same bytes with a fraction of the copies and context switches.

Trust: for every pair and every round, the member that opens the connection makes a fresh
32-byte key and hands it to the other over libp2p (`DirectOffer`), so only those two peers
know it; the answer says where the other listens. The connection opens with the round ID and
the opener's peer ID in the clear, then every frame in both directions carries a Poly1305 tag
under a one-time key derived from the pair key, the direction and the frame's sequence number
(HMAC-SHA256), over the header and the payload. A frame that is forged, altered, replayed,
reordered or cut fails its tag and ends the connection (the round then falls back to libp2p
for what is left); a key serves one connection only. Nobody outside the pair can inject or
alter data, and no member can speak for another.

The direct path is NOT encrypted: anyone on the network path can read the averaged values.
Use transport "libp2p" (`swarmlm train --swarm --collab-transport libp2p`) to keep libp2p's
encryption for everything. Knows nothing of parts' meaning, codecs or aggregation.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import ipaddress
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.poly1305 import Poly1305

from swarmlm.errors import IntegrityError, PeerError, WireError
from swarmlm.log import get_logger

log = get_logger(__name__)

OFFER_HANDLER = "swarmlm/collab/direct/1"
KEY_BYTES = 32
TAG_BYTES = 16
GROUP_ID_BYTES = 16
MAX_PEER_ID_BYTES = 128
HELLO_TIMEOUT_S = 10.0          # an opened connection must say who it is within this
_MAGIC = b"SWD1"
_OFFERS_KEPT = 4096             # keys waiting for their connection; the oldest are forgotten first
_SOCKET_BUFFER_BYTES = 4 << 20  # several parts in flight per connection: a sender whose receiver is not
                                # scheduled (more peers than cores) goes on writing instead of waiting

# frame kinds
HELLO, PART, REPLY, ERROR = 1, 2, 3, 4
# ERROR frames: `count` says whether the other side may retry the rest over libp2p
RETRY, FATAL = 1, 0

# magic | kind | direction | pad | seq | part | count | weight | payload length
_HEADER = struct.Struct("<4sBBxxQIIdQ")
_PREFIX = struct.Struct("<4s16sB")  # magic | group ID | peer ID length; then the peer ID


@dataclass(frozen=True)
class DirectOffer:
    group_id: bytes                 # the round this key is for
    key: bytes                      # KEY_BYTES fresh random bytes, known to the two members only


@dataclass(frozen=True)
class DirectAnswer:
    hosts: list[str] = field(default_factory=list)    # where the answering peer listens; []: use libp2p
    port: int = 0


@dataclass(frozen=True)
class Frame:
    kind: int
    part: int
    count: int                      # REPLY: contributions kept; ERROR: RETRY or FATAL
    weight: float                   # PART: the sender's sample count; REPLY: summed weight kept


class BufferPool:
    """Receive buffers kept from one round to the next, up to `max_bytes`: receiving into memory the
    kernel has already mapped costs a quarter of receiving into fresh pages. The caller gives a
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


def new_key() -> bytes:
    return os.urandom(KEY_BYTES)


def check_offer(offer: DirectOffer) -> None:
    if len(offer.group_id) != GROUP_ID_BYTES or len(offer.key) != KEY_BYTES:
        raise WireError("a direct offer needs a 16-byte group ID and a 32-byte key")


def _tag(key: bytes, direction: int, seq: int, header: bytes, payload: Any) -> bytes:
    frame_key = hmac.digest(key, struct.pack("<BQ", direction, seq), "sha256")   # one-time Poly1305 key
    mac = Poly1305(frame_key)
    mac.update(header)
    if len(payload):
        mac.update(payload)
    return mac.finalize()


class Channel:
    """One authenticated connection: frames out with `send`, in with `recv`. Either side may use
    `send` from several tasks at once (a lock keeps frames whole); `recv` from one task."""

    def __init__(self, sock: socket.socket, key: bytes, *, opener: bool):
        self.sock = sock
        self.key = key
        self._out_dir, self._in_dir = (0, 1) if opener else (1, 0)
        self._out_seq = 0
        self._in_seq = 0
        self._lock = asyncio.Lock()
        self._loop = asyncio.get_running_loop()
        self.bytes_sent = 0
        self.bytes_received = 0

    async def send(self, kind: int, *, part: int = 0, count: int = 0, weight: float = 0.0,
                   payload: Any = b"") -> None:
        async with self._lock:
            header = _HEADER.pack(_MAGIC, kind, self._out_dir, self._out_seq, part, count, weight, len(payload))
            tag = _tag(self.key, self._out_dir, self._out_seq, header, payload)
            self._out_seq += 1
            if len(payload) < 65536:            # small frames in one write (one segment, no Nagle wait)
                await self._loop.sock_sendall(self.sock, header + bytes(payload) + tag)
            else:
                await self._loop.sock_sendall(self.sock, header)
                await self._loop.sock_sendall(self.sock, payload)
                await self._loop.sock_sendall(self.sock, tag)
            self.bytes_sent += len(header) + len(payload) + len(tag)

    async def recv(self, limit: Callable[[int, int], int],
                   into: Callable[[int, int, int], memoryview | None] | None = None
                   ) -> tuple[Frame, bytearray | memoryview]:
        """The next frame and its payload (checked). `limit(kind, part)` bounds the payload before a
        byte of it is read (`WireError` above it); `IntegrityError` if the tag does not verify.
        `into(kind, part, length)` may name the buffer the payload lands in (saving a copy); its
        contents are only valid once `recv` returns."""
        header = bytes(await self._read(_HEADER.size))
        magic, kind, direction, seq, part, count, weight, length = _HEADER.unpack(header)
        if magic != _MAGIC or kind not in (HELLO, PART, REPLY, ERROR) or direction != self._in_dir:
            raise IntegrityError("not a frame of this connection")
        if seq != self._in_seq:
            raise IntegrityError(f"frame {seq} arrived where {self._in_seq} was due")
        max_bytes = 4096 if kind in (HELLO, ERROR) else limit(kind, part)
        if length > max_bytes:
            raise WireError(f"a frame of {length} bytes for part {part}; at most {max_bytes} expected")
        target = into(kind, part, length) if into is not None and kind in (PART, REPLY) else None
        payload = await self._read(length, target if target is not None and len(target) == length else None)
        tag = bytes(await self._read(TAG_BYTES))
        if not hmac.compare_digest(tag, _tag(self.key, direction, seq, header, payload)):
            raise IntegrityError(f"frame {seq} fails its tag")
        self._in_seq += 1
        self.bytes_received += len(header) + length + TAG_BYTES
        return Frame(kind, part, count, weight), payload

    async def _read(self, n: int, target: memoryview | None = None) -> bytearray | memoryview:
        buf = bytearray(n) if target is None else target
        view = memoryview(buf)
        got = 0
        while got < n:
            k = await self._loop.sock_recv_into(self.sock, view[got:])
            if k == 0:
                raise ConnectionError("the connection closed mid-frame" if got else "the connection closed")
            got += k
        return buf

    async def send_error(self, message: str, *, retry: bool) -> None:
        """Best effort: tell the other side why this connection ends."""
        with contextlib.suppress(OSError, ConnectionError):
            await asyncio.wait_for(self.send(ERROR, count=RETRY if retry else FATAL,
                                             payload=message.encode("utf-8", "replace")[:4096]), 2.0)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


# ---- opening ------------------------------------------------------------------------------------

def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with contextlib.suppress(OSError):      # the kernel caps these at its own maximum
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER_BYTES)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER_BYTES)


async def connect(answer: DirectAnswer, key: bytes, group_id: bytes, peer_id: str, *,
                  timeout_s: float) -> Channel:
    """Connect to the first reachable address of `answer` and say hello; `PeerError` if none answers."""
    if not 0 < answer.port < 65536 or not answer.hosts:
        raise PeerError("the peer offers no direct address")
    loop = asyncio.get_running_loop()
    errors = []
    for host in answer.hosts[:8]:
        try:
            family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        except ValueError:
            errors.append(f"{host!r} is not an IP address")
            continue
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        _tune(sock)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (host, answer.port)), timeout_s)
        except (OSError, asyncio.TimeoutError) as e:
            sock.close()
            errors.append(f"{host}:{answer.port}: {e or 'timed out'}")
            continue
        chan = Channel(sock, key, opener=True)
        pid = peer_id.encode()
        prefix = _PREFIX.pack(_MAGIC, group_id, len(pid)) + pid
        try:
            await loop.sock_sendall(sock, prefix)
            await chan.send(HELLO, payload=prefix)          # binds the clear prefix to the key
        except OSError as e:
            chan.close()
            errors.append(f"{host}:{answer.port}: {e}")
            continue
        return chan
    raise PeerError("no direct connection: " + "; ".join(errors))


class DirectListener:
    """Accepts direct connections; hands each authenticated one to `serve(channel, peer_id, group_id)`.

    Keys arrive through `expect` (from a `DirectOffer` over libp2p); a connection whose opener
    and round have no key waiting, or whose hello fails its tag, is closed unanswered."""

    def __init__(self, sock: socket.socket, serve: Callable[[Channel, str, bytes], Awaitable[None]],
                 hosts: list[str]):
        self._sock = sock
        self._serve = serve
        self.hosts = hosts
        self.port = sock.getsockname()[1]
        self._keys: collections.OrderedDict[tuple[bytes, str], bytes] = collections.OrderedDict()
        self._tasks: set[asyncio.Task] = set()
        self._accepting: asyncio.Task | None = None

    @classmethod
    async def create(cls, host: str, serve: Callable[[Channel, str, bytes], Awaitable[None]], *,
                     announce: list[str] | None = None) -> DirectListener:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _tune(sock)                             # accepted connections inherit the buffer sizes
        sock.bind((host, 0))
        sock.listen(64)
        sock.setblocking(False)
        unspecified = ipaddress.ip_address(host).is_unspecified
        hosts = list(announce or []) if unspecified else [host]
        listener = cls(sock, serve, hosts)
        listener._accepting = asyncio.ensure_future(listener._accept_forever())
        return listener

    def answer(self) -> DirectAnswer:
        return DirectAnswer(list(self.hosts), self.port) if self.hosts else DirectAnswer()

    def expect(self, group_id: bytes, peer_id: str, key: bytes) -> None:
        """`peer_id` will connect for round `group_id` with `key` (a newer offer replaces an older one)."""
        self._keys.pop((group_id, peer_id), None)
        self._keys[(group_id, peer_id)] = key
        while len(self._keys) > _OFFERS_KEPT:
            self._keys.popitem(last=False)

    async def close(self) -> None:
        tasks = [t for t in [self._accepting, *self._tasks] if t is not None]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        self._sock.close()

    async def _accept_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except OSError as e:
                log.info("direct listener: %s", e)
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            _tune(conn)
            task = asyncio.ensure_future(self._handle(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _handle(self, conn: socket.socket) -> None:
        chan = None
        try:
            opened = await asyncio.wait_for(self._hello(conn), HELLO_TIMEOUT_S)
            if opened is None:
                return
            chan, peer_id, group_id = opened
            await self._serve(chan, peer_id, group_id)
        except (asyncio.TimeoutError, ConnectionError, OSError, IntegrityError, WireError) as e:
            log.info("direct connection ended: %s", e)
        except Exception as e:                  # never let one connection take the listener down
            log.warning("direct connection failed", exc_info=e)
        finally:
            if chan is not None:
                chan.close()
            else:
                conn.close()

    async def _hello(self, conn: socket.socket) -> tuple[Channel, str, bytes] | None:
        raw = Channel(conn, b"", opener=False)
        prefix = await raw._read(_PREFIX.size)
        magic, group_id, n = _PREFIX.unpack(prefix)
        if magic != _MAGIC or not 0 < n <= MAX_PEER_ID_BYTES:
            raise WireError("not a direct connection")
        pid_bytes = await raw._read(n)
        peer_id = pid_bytes.decode("ascii", "replace")
        key = self._keys.pop((group_id, peer_id), None)
        if key is None:
            raise IntegrityError(f"no key waits for {peer_id} in round {group_id.hex()[:8]}")
        chan = Channel(conn, key, opener=False)
        frame, payload = await chan.recv(limit=lambda kind, part: 0)
        if frame.kind != HELLO or bytes(payload) != bytes(prefix + pid_bytes):
            raise IntegrityError(f"{peer_id} sent a bad hello")
        return chan, peer_id, bytes(group_id)
