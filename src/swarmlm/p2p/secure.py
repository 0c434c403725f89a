"""Encrypted direct TCP connections between two peers, keyed over libp2p, for small, frequent messages.

    listener = await SecureListener.start("127.0.0.1", handler)   # handler(peer_id, reader, writer)
    key_id = listener.expect(key, peer_id)        # key: 32 bytes the caller sent over libp2p
    reader, writer = await connect_secure(host, listener.port, key, timeout_s=5)

Why: a message through p2pd crosses two unix sockets and two Go daemons each way, and a
daemon that slept while the peer computed must be woken at each one; for a decoding step
(a few KiB every few milliseconds) that costs about as much as a Transformer block. One TCP
connection between the two processes costs one wake-up a message.

Trust: the caller makes a fresh 32-byte key for every connection and sends it inside a
libp2p call (encrypted, and authenticated to both peer IDs); the listener files it under
`key_id(key)` with the caller's peer ID. The connection opens with a magic and that key ID
in the clear, then every record in both directions is AES-256-GCM under a key derived from
the shared key and the direction, with the record's sequence number as its nonce and its
length as associated data, so records cannot be read, forged, altered, replayed, reordered
or cut without the connection failing. The listener answers an accepted hello with an empty
record, which proves to the caller that the other end knows the key. A key serves one
connection and expires if unused. The handler sees the libp2p-authenticated peer ID of the
key's sender: to it, the connection is as good as a libp2p stream from that peer.

The reader and writer have the `readexactly` / `write` / `drain` / `close` that rpc.py's
framing uses, so `rpc.Channel` and `rpc.serve_channel` run over them unchanged: each
`write` is one record. Knows nothing of what the frames mean.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import struct
import time
from collections import OrderedDict
from typing import Awaitable, Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from swarmlm.errors import PeerError, PeerTimeout, WireError
from swarmlm.log import get_logger

logger = get_logger(__name__)

KEY_BYTES = 32
KEY_ID_BYTES = 16
TAG_BYTES = 16
MAGIC = b"SLS1"
HELLO_TIMEOUT_S = 10.0          # a connection that names no expected key in time is dropped
KEY_TTL_S = 60.0                # an expected key not used within this is forgotten
MAX_EXPECTED = 4096             # keys waiting for their connection; the oldest are forgotten first
_LENGTH = struct.Struct(">I")
_NONCE_PREFIX = b"\x00" * 4

SecureHandler = Callable[[str, "SecureReader", "SecureWriter"], Awaitable[None]]


def key_id(key: bytes) -> bytes:
    """The public name of a connection key: it says nothing about the key."""
    return hmac.digest(key, b"swarmlm secure key id", hashlib.sha256)[:KEY_ID_BYTES]


def _direction_keys(key: bytes) -> tuple[AESGCM, AESGCM]:
    """(caller -> listener, listener -> caller) ciphers: separate keys, so the nonces never meet."""
    return (AESGCM(hmac.digest(key, b"swarmlm secure c2s", hashlib.sha256)),
            AESGCM(hmac.digest(key, b"swarmlm secure s2c", hashlib.sha256)))


def check_key(key: object) -> bytes:
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
        raise WireError(f"a secure connection key has {KEY_BYTES} bytes")
    return bytes(key)


class SecureReader:
    """Decrypts records from a TCP stream; `readexactly(n)` over their concatenated plaintext."""

    def __init__(self, reader: asyncio.StreamReader, cipher: AESGCM, *, max_record_bytes: int):
        self._reader = reader
        self._cipher = cipher
        self._seq = 0
        self._buffer = bytearray()
        self.max_record_bytes = max_record_bytes   # the largest plaintext record accepted

    async def read_record(self) -> bytes:
        """The next record's plaintext. `PeerError` if it is too long or fails its tag (the peer, or
        someone on the path, misbehaved), `asyncio.IncompleteReadError` if the connection ends first."""
        (length,) = _LENGTH.unpack(await self._reader.readexactly(_LENGTH.size))
        if not TAG_BYTES <= length <= self.max_record_bytes + TAG_BYTES:
            raise PeerError(f"secure record of {length} bytes, limit {self.max_record_bytes + TAG_BYTES}")
        sealed = await self._reader.readexactly(length)
        nonce = _NONCE_PREFIX + self._seq.to_bytes(8, "big")
        try:
            plain = self._cipher.decrypt(nonce, sealed, _LENGTH.pack(length))
        except InvalidTag:
            raise PeerError("a secure record failed its authentication tag") from None
        self._seq += 1
        return plain

    async def readexactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            try:
                record = await self.read_record()
            except asyncio.IncompleteReadError as e:
                raise asyncio.IncompleteReadError(bytes(self._buffer), n) from e
            if not self._buffer and len(record) == n:
                return record                   # the common case: one frame, one record, no copy
            self._buffer += record
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    async def read(self, n: int = -1) -> bytes:
        """Up to n bytes of plaintext (b"" at the end): for draining what a caller still sends."""
        if not self._buffer:
            try:
                self._buffer += await self.read_record()
            except (asyncio.IncompleteReadError, PeerError):
                return b""
        n = len(self._buffer) if n < 0 else min(n, len(self._buffer))
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data


class SecureWriter:
    """Encrypts each `write` as one record onto a TCP stream."""

    def __init__(self, writer: asyncio.StreamWriter, cipher: AESGCM):
        self._writer = writer
        self._cipher = cipher
        self._seq = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        length = len(data) + TAG_BYTES
        header = _LENGTH.pack(length)
        nonce = _NONCE_PREFIX + self._seq.to_bytes(8, "big")
        self._seq += 1
        self._writer.write(header + self._cipher.encrypt(nonce, bytes(data), header))

    async def drain(self) -> None:
        await self._writer.drain()

    def close(self) -> None:
        self._writer.close()

    def is_closing(self) -> bool:
        return self._writer.is_closing()

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self._writer.get_extra_info(name, default)


class SecureListener:
    """A TCP listener that serves only connections keyed by a key it was told to expect."""

    def __init__(self, handler: SecureHandler, *, max_record_bytes: int, clock: Callable[[], float]):
        self._handler = handler
        self._max_record_bytes = max_record_bytes
        self._clock = clock
        self._expected: OrderedDict[bytes, tuple[bytes, str, float]] = OrderedDict()  # id -> (key, peer, expiry)
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self.host = ""
        self.port = 0
        self.refused = 0               # connections dropped for a bad hello (tests, logs)

    @classmethod
    async def start(cls, host: str, handler: SecureHandler, *, port: int = 0, max_record_bytes: int,
                    clock: Callable[[], float] = time.monotonic) -> SecureListener:
        self = cls(handler, max_record_bytes=max_record_bytes, clock=clock)
        self._server = await asyncio.start_server(self._accept, host, port, limit=1 << 20)
        self.host, self.port = host, self._server.sockets[0].getsockname()[1]
        logger.debug("secure listener on %s:%d", host, self.port)
        return self

    def expect(self, key: bytes, peer_id: str, *, ttl_s: float = KEY_TTL_S) -> bytes:
        """Accept one connection keyed by `key` (sent by `peer_id` over libp2p) within `ttl_s`; its key ID."""
        key = check_key(key)
        kid = key_id(key)
        now = self._clock()
        while self._expected and (len(self._expected) >= MAX_EXPECTED or next(iter(self._expected.values()))[2] < now):
            self._expected.popitem(last=False)
        self._expected[kid] = (key, peer_id, now + ttl_s)
        return kid

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            opened = await self._hello(reader, writer)
            if opened is not None:
                await self._handler(*opened)
        except asyncio.CancelledError:
            pass            # closing: asyncio would log a cancelled connection task as an error
        except (ConnectionError, OSError) as e:
            logger.debug("secure connection closed: %s", e)
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _hello(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                     ) -> tuple[str, SecureReader, SecureWriter] | None:
        try:
            hello = await asyncio.wait_for(reader.readexactly(len(MAGIC) + KEY_ID_BYTES), HELLO_TIMEOUT_S)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError) as e:
            return self._refuse(writer, f"no hello ({type(e).__name__})")
        if hello[:len(MAGIC)] != MAGIC:
            return self._refuse(writer, "not a secure connection")
        entry = self._expected.pop(hello[len(MAGIC):], None)
        if entry is None:
            return self._refuse(writer, "unknown or used key")
        key, peer_id, expires = entry
        if expires < self._clock():
            return self._refuse(writer, "expired key")
        c2s, s2c = _direction_keys(key)
        secure_writer = SecureWriter(writer, s2c)
        secure_writer.write(b"")             # welcome: proves we hold the key
        await secure_writer.drain()
        return peer_id, SecureReader(reader, c2s, max_record_bytes=self._max_record_bytes), secure_writer

    def _refuse(self, writer: asyncio.StreamWriter, why: str) -> None:
        self.refused += 1
        logger.info("secure connection from %s refused: %s", writer.get_extra_info("peername"), why)
        return None

    def abort(self) -> None:
        """Stop listening and cut every open connection at once (no awaiting: a dying peer)."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()

    async def close(self) -> None:
        self.abort()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5.0)


async def connect_secure(host: str, port: int, key: bytes, *, timeout_s: float, max_record_bytes: int
                         ) -> tuple[SecureReader, SecureWriter]:
    """Dial a listener that expects `key`; `PeerError` if it cannot be reached or does not know the key."""
    key = check_key(key)
    if not isinstance(host, str) or not 0 < len(host) <= 64 or not isinstance(port, int) or not 0 < port < 65536:
        raise PeerError(f"bad secure address {host!r}:{port!r}")
    where = f"secure {host}:{port}"
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, limit=1 << 20), timeout_s)
    except asyncio.TimeoutError:
        raise PeerTimeout(f"{where}: no connection in {timeout_s:.1f} s") from None
    except OSError as e:
        raise PeerError(f"{where}: {e}") from None
    c2s, s2c = _direction_keys(key)
    secure_reader = SecureReader(reader, s2c, max_record_bytes=max_record_bytes)
    try:
        writer.write(MAGIC + key_id(key))
        welcome = await asyncio.wait_for(secure_reader.read_record(), timeout_s)
        if welcome:
            raise PeerError(f"{where}: unexpected welcome")
    except asyncio.TimeoutError:
        writer.close()
        raise PeerTimeout(f"{where}: no welcome in {timeout_s:.1f} s") from None
    except (ConnectionError, OSError, asyncio.IncompleteReadError, PeerError) as e:
        writer.close()
        raise PeerError(f"{where}: refused ({type(e).__name__}: {e})") from None
    except BaseException:
        writer.close()
        raise
    return secure_reader, SecureWriter(writer, c2s)


def new_key() -> bytes:
    """A fresh connection key, to send to the listener's peer over libp2p."""
    return os.urandom(KEY_BYTES)
