"""`Connection`: one encrypted TCP connection of the side channel, and its record layer.

Every byte after the hello travels in AEAD records, each direction under its own key:

    record = length (4 bytes, big-endian: sealed bytes that follow) | AES-256-GCM(plaintext) + tag (16)
    nonce  = 4 zero bytes | the record's sequence number in its direction (8 bytes, big-endian)
    AAD    = the 4 length bytes

so a record that is altered, forged, replayed, reordered or cut fails its tag, and the
connection ends (`PeerError`); a length above the connection's limit is refused before a byte
of the record is read. The two direction keys come from HKDF-SHA256 over the one-use key the
dialer sent over libp2p, with both peer IDs and the purpose in its info: a key used between
other peers, or for another purpose, derives other keys and fails the first record.

A `Connection` is an asyncio protocol that serves as both reader and writer:
- records: `read_record()`, `read_record_into(buffer)` (decrypted straight into the caller's
  memory: a 256 KiB block or an averaging part is written once), `write(data)` (one record);
- a byte stream over the records' plaintext: `readexactly(n)`, with `write` / `drain` /
  `close`, which is all that rpc.py's framing (`rpc.Channel`, `serve_channel`) needs.
The kernel receives a large record straight into a buffer of its size (one copy, no
StreamReader); a small one, header and all, into one scratch buffer in one receive.

`set_record_handler(fn)` turns a connection of small records (decoding steps, pushes) to records
handled as they arrive: `buffer_updated` decrypts each complete record and offers it to `fn` in
the loop's own callback (no task is woken, nothing is awaited: swarm/server/fast.py's steps run
there); a record `fn` declines joins the byte stream `readexactly` reads, in order.
Knows nothing of peers' discovery, of handshakes or of what records mean.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any, Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from swarmlm.errors import PeerError
from swarmlm.log import get_logger

logger = get_logger(__name__)

KEY_BYTES = 32
TAG_BYTES = 16
_LENGTH = struct.Struct(">I")
_NONCE_PREFIX = b"\x00" * 4
_READ_BUFFER = 256 << 10          # buffered plaintext-to-be before the socket is paused
_BIG = 64 << 10                   # records from this size are encrypted into one preallocated buffer


def direction_keys(key: bytes, *, dialer: str, listener: str, purpose: str) -> tuple[AESGCM, AESGCM]:
    """(dialer -> listener, listener -> dialer) ciphers for `key`, bound to both peers and the purpose."""
    info = b"\0".join([b"swarmlm side channel 1", dialer.encode(), listener.encode(), purpose.encode()])
    okm = HKDF(algorithm=hashes.SHA256(), length=2 * KEY_BYTES, salt=None, info=info).derive(key)
    return AESGCM(okm[:KEY_BYTES]), AESGCM(okm[KEY_BYTES:])


def _nonce(seq: int) -> bytes:
    return _NONCE_PREFIX + seq.to_bytes(8, "big")


class Connection(asyncio.BufferedProtocol):
    """Build through `SideChannel.open` (dialer) or its listener; `start` arms the ciphers."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._scratch = bytearray(64 << 10)
        self._pending = bytearray()            # received, not yet asked for
        self._target: bytearray | memoryview | None = None   # the raw read in progress lands here
        self._filled = 0
        self._waiter: asyncio.Future | None = None
        self._eof = False
        self._error: BaseException | None = None
        self._paused_reading = False
        self._paused_writing = False
        self._drain_waiter: asyncio.Future | None = None
        self._plain = bytearray()              # readexactly's leftover plaintext
        self._send: AESGCM | None = None
        self._recv: AESGCM | None = None
        self._send_seq = 0
        self._recv_seq = 0
        self.max_record_bytes = 0              # the largest plaintext record this side accepts
        self.peer_id = ""                      # the other end, authenticated by the key exchange
        self.purpose = ""
        self.bytes_sent = 0                    # on the wire, headers and tags included
        self.bytes_received = 0
        self.closed = asyncio.Event()
        self._on_record: Callable[[bytes | None], bool] | None = None   # set_record_handler's
        self._fault: PeerError | None = None   # a record that failed its checks in buffer_updated
        self._dispatching = False              # records are decrypted in buffer_updated (set_record_handler)

    def start(self, send: AESGCM, recv: AESGCM, *, peer_id: str, purpose: str, max_record_bytes: int) -> None:
        self._send, self._recv = send, recv
        self.peer_id, self.purpose, self.max_record_bytes = peer_id, purpose, max_record_bytes

    # ---- protocol callbacks ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport            # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._target is not None:
            return memoryview(self._target)[self._filled:]
        return memoryview(self._scratch)

    def buffer_updated(self, nbytes: int) -> None:
        self.bytes_received += nbytes
        if self._target is not None:
            self._filled += nbytes
            if self._filled == len(self._target):
                self._target = None            # full: a loop that reads on at once (uvloop) gets the scratch buffer
                self._wake()
            return
        if self._dispatching and not self._pending:    # the common case: whole records, straight from scratch
            view = memoryview(self._scratch)[:nbytes]
            used = self._dispatch_from(view)
            if used < nbytes and self._fault is None:
                self._pending += view[used:]
            backlog = len(self._plain)             # a partial record is read on, whatever its size
        elif self._dispatching:
            self._pending += memoryview(self._scratch)[:nbytes]
            self._dispatch()
            backlog = len(self._plain)
        else:
            self._pending += memoryview(self._scratch)[:nbytes]
            backlog = len(self._pending)
        if backlog > _READ_BUFFER and not self._paused_reading:
            self._paused_reading = True
            self._transport.pause_reading()
        self._wake()

    def set_record_handler(self, handler: Callable[[bytes | None], bool] | None) -> None:
        """Offer every record to `handler(plaintext) -> consumed` as it arrives, in the loop's callback
        (it must not block); records it declines (False) are read by `readexactly` as before. Only for
        connections read through `readexactly` (rpc framing), not `read_record`. A record already
        received is offered at once; `handler(None)` says, once, that the connection is lost."""
        self._on_record = handler
        self._dispatching = self._dispatching or handler is not None     # for good: _plain holds the rest
        if handler is not None and self._pending and self._target is None:
            self._dispatch()
            self._wake()

    def _dispatch(self) -> None:
        """The complete records in `_pending`, dispatched and dropped from it."""
        if len(self._pending) < _LENGTH.size:
            return
        (length,) = _LENGTH.unpack_from(self._pending)
        if length <= self.max_record_bytes + TAG_BYTES and len(self._pending) < _LENGTH.size + length:
            return                                 # a large record still arriving: no copy per receive
        data = bytes(self._pending)
        used = self._dispatch_from(memoryview(data))
        del self._pending[:used]

    def _dispatch_from(self, data: memoryview) -> int:
        """Decrypt the complete records at the start of `data`, in order, each to the handler or to
        `_plain`; the bytes they took."""
        at = 0
        while self._fault is None and len(data) - at >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(data, at)
            if not TAG_BYTES <= length <= self.max_record_bytes + TAG_BYTES:
                self._refuse(f"a side-channel record of {length - TAG_BYTES} bytes from {self.peer_id or 'a peer'}, "
                             f"limit {self.max_record_bytes}")
                return at
            end = at + _LENGTH.size + length
            if len(data) < end:
                return at
            seq, self._recv_seq = self._recv_seq, self._recv_seq + 1
            try:
                plain = self._recv.decrypt(_nonce(seq), data[at + _LENGTH.size:end], data[at:at + _LENGTH.size])
            except InvalidTag:
                self._refuse(f"a side-channel record from {self.peer_id or 'a peer'} failed its tag")
                return at
            at = end
            try:
                consumed = self._on_record is not None and self._on_record(plain)
            except Exception:                   # a handler's bug: this connection ends, the peer goes on
                logger.exception("a record handler failed on a record from %s", self.peer_id)
                self._refuse(f"a record from {self.peer_id or 'a peer'} could not be handled")
                return at
            if not consumed:
                self._plain += plain
            if self._transport is None or self._transport.is_closing():
                return at
        return at

    def _refuse(self, why: str) -> None:
        """A record that cannot be trusted: nothing after it is read; the reader gets what came before it,
        then `PeerError` (and answers or closes, as for a bad record it read itself); the handler is told
        the connection is lost."""
        self._fault = PeerError(why)
        self._pending.clear()
        if self._transport is not None and not self._paused_reading:
            self._paused_reading = True
            self._transport.pause_reading()
        self._tell_lost()

    def _tell_lost(self) -> None:
        """`handler(None)`, once: nothing more will come."""
        if self._on_record is not None:
            handler, self._on_record = self._on_record, None
            try:
                handler(None)
            except Exception:
                logger.exception("a record handler failed on the loss of its connection to %s", self.peer_id)

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._error = exc
        self._wake()
        self.closed.set()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_exception(exc or ConnectionResetError("connection lost"))
        self._tell_lost()

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # ---- raw bytes --------------------------------------------------------------------------------

    async def read_raw(self, n: int, into: bytearray | memoryview | None = None) -> bytearray | memoryview:
        """Exactly n bytes off the socket (into `into` if given, of length n); `IncompleteReadError`
        if the connection ends first."""
        if into is None and n < _BIG:           # a small read: whatever arrived with it stays in _pending
            while len(self._pending) < n:
                if self._eof:
                    raise asyncio.IncompleteReadError(bytes(self._pending), n)
                await self._wait_for_bytes()
            data = self._pending[:n]
            del self._pending[:n]
            return data
        target = bytearray(n) if into is None else into
        have = min(len(self._pending), n)
        if have:
            target[:have] = self._pending[:have]
            del self._pending[:have]
        if have == n:
            return target
        self._target, self._filled = target, have
        if self._paused_reading:
            self._paused_reading = False
            self._transport.resume_reading()
        try:
            while self._filled < n:
                if self._eof:
                    raise asyncio.IncompleteReadError(bytes(target[:self._filled]), n)
                self._waiter = self._loop.create_future()
                await self._waiter
        finally:
            self._target, self._waiter = None, None
        return target

    async def _wait_for_bytes(self) -> None:
        if self._paused_reading and self._fault is None:
            self._paused_reading = False
            self._transport.resume_reading()
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def write_raw(self, data: bytes | bytearray | memoryview) -> None:
        if self._transport is None or self._transport.is_closing():
            raise ConnectionResetError("the connection is closed")
        self._transport.write(data)
        self.bytes_sent += len(data)

    # ---- records ----------------------------------------------------------------------------------

    async def _read_sealed(self, limit: int) -> tuple[bytes, bytearray, int]:
        if self._dispatching:
            raise RuntimeError("records are dispatched as they arrive on this connection: read with readexactly")
        header = bytes(await self.read_raw(_LENGTH.size))
        (length,) = _LENGTH.unpack(header)
        if not TAG_BYTES <= length <= limit + TAG_BYTES:
            raise PeerError(f"a side-channel record of {length - TAG_BYTES} bytes from {self.peer_id or 'a peer'}, "
                            f"limit {limit}")
        sealed = await self.read_raw(length)
        seq, self._recv_seq = self._recv_seq, self._recv_seq + 1
        return header, sealed, seq

    async def read_record(self) -> bytes:
        """The next record's plaintext. `PeerError` if it is too long or fails its tag; `IncompleteReadError`
        if the connection ends first."""
        header, sealed, seq = await self._read_sealed(self.max_record_bytes)
        try:
            return self._recv.decrypt(_nonce(seq), sealed, header)
        except InvalidTag:
            raise PeerError(f"a side-channel record from {self.peer_id or 'a peer'} failed its tag") from None

    async def read_record_into(self, buffer: bytearray | memoryview) -> int:
        """Decrypt the next record into `buffer` (at most its size); the plaintext's length."""
        header, sealed, seq = await self._read_sealed(min(len(buffer), self.max_record_bytes))
        n = len(sealed) - TAG_BYTES
        try:
            self._recv.decrypt_into(_nonce(seq), sealed, header, memoryview(buffer)[:n])
        except InvalidTag:
            raise PeerError(f"a side-channel record from {self.peer_id or 'a peer'} failed its tag") from None
        return n

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send `data` as one record (written to the socket before this returns, or buffered by it)."""
        n = len(data)
        header = _LENGTH.pack(n + TAG_BYTES)
        seq, self._send_seq = self._send_seq, self._send_seq + 1
        if n < _BIG:
            self.write_raw(header + self._send.encrypt(_nonce(seq), bytes(data), header))
            return
        out = bytearray(_LENGTH.size + n + TAG_BYTES)
        out[:_LENGTH.size] = header
        self._send.encrypt_into(_nonce(seq), data, header, memoryview(out)[_LENGTH.size:])
        self.write_raw(out)

    # ---- a byte stream over the records (rpc.py's framing) ------------------------------------------

    async def readexactly(self, n: int) -> bytes:
        if self._dispatching:
            return await self._read_dispatched(n)
        while len(self._plain) < n:
            try:
                record = await self.read_record()
            except asyncio.IncompleteReadError as e:
                raise asyncio.IncompleteReadError(bytes(self._plain), n) from e
            if not self._plain and len(record) == n:
                return record                  # the common case: one frame, one record, no copy
            self._plain += record
        data = bytes(self._plain[:n])
        del self._plain[:n]
        return data

    async def _read_dispatched(self, n: int) -> bytes:
        """readexactly where buffer_updated decrypts: the records the handler declined."""
        while len(self._plain) < n:
            if self._fault is not None:
                raise self._fault
            if self._eof:
                raise asyncio.IncompleteReadError(bytes(self._plain), n)
            await self._wait_for_bytes()
        data = bytes(self._plain[:n])
        del self._plain[:n]
        return data

    async def read(self, n: int = -1) -> bytes:
        """Up to n bytes of plaintext (b"" at the end or on a bad record): for draining a caller."""
        while self._dispatching and not self._plain:
            if self._fault is not None or self._eof:
                return b""
            await self._wait_for_bytes()
        if not self._plain:
            try:
                self._plain += await self.read_record()
            except (asyncio.IncompleteReadError, PeerError, ConnectionError):
                return b""
        n = len(self._plain) if n < 0 else min(n, len(self._plain))
        data = bytes(self._plain[:n])
        del self._plain[:n]
        return data

    async def drain(self) -> None:
        if self._eof and self._error is not None:
            raise ConnectionResetError(str(self._error))
        if self._paused_writing:
            if self._drain_waiter is None or self._drain_waiter.done():
                self._drain_waiter = self._loop.create_future()
            await asyncio.shield(self._drain_waiter)      # several writers may wait on the one resume

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport is None or self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default if self._transport is None else self._transport.get_extra_info(name, default)
