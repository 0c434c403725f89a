"""RPC framing: how requests, replies, errors and streamed chunks look as bytes.

Unary replies carry one status byte: `0x00` + payload, or `0x01` + a UTF-8 error message, so
a handler's failure reaches the caller as `RemoteError(message)` while the serving peer goes
on. Streams are a sequence of frames, each `tag (1 byte) | length (4 bytes, big-endian) |
payload`: the caller sends one REQUEST frame, the server answers with DATA frames and ends
with END or ERROR. Every length is checked against a limit before a byte of payload is read.
A channel (`serve_channel` / `Channel`) keeps one stream open for many request/reply pairs:
each REQUEST frame is answered by one DATA or ERROR frame, and END closes it; it saves the
cost of a new stream (or a unary call through the daemon) per request.

`message_handler` / `call_message` put typed messages (frozen dataclasses through
`serialize.encode_message`/`decode_message`) on top of the byte-level `Peer.call`. Never
pickle. Knows nothing of hivemind: `Peer` and `MemoryPeer` both use these helpers.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any, AsyncIterator, Awaitable, Callable

from swarmlm import serialize
from swarmlm.errors import PeerError, PeerTimeout, RemoteError, SwarmlmError, WireError
from swarmlm.log import get_logger

logger = get_logger(__name__)

MAX_ERROR_BYTES = 4096            # an error message is cut to this length
_OK, _ERR = b"\x00", b"\x01"

# stream frame tags
REQUEST, DATA, END, ERROR = 0, 1, 2, 3
LINGER_S = 5.0          # how long a served stream waits for the caller to close its side
_HEADER = struct.Struct(">BI")
FRAME_HEADER_BYTES = _HEADER.size


def frame_bytes(max_payload_bytes: int) -> int:
    """The largest frame (header included) a reader allowing `max_payload_bytes` may get: an
    ERROR frame may be longer than a small payload limit."""
    return max(max_payload_bytes, MAX_ERROR_BYTES) + FRAME_HEADER_BYTES

UnaryHandler = Callable[[str, bytes], Awaitable[bytes]]               # (peer_id, request) -> reply
StreamHandler = Callable[[str, bytes], AsyncIterator[bytes]]          # (peer_id, request) -> chunks


# ---- unary replies -----------------------------------------------------------------------

def ok_reply(payload: bytes) -> bytes:
    return _OK + payload


def error_reply(message: str) -> bytes:
    return _ERR + message.encode("utf-8", "replace")[:MAX_ERROR_BYTES]


def parse_reply(reply: bytes, *, peer_id: str, name: str, max_bytes: int) -> bytes:
    """The payload of a unary reply; `RemoteError` for an error reply, `PeerError` for garbage."""
    if not isinstance(reply, (bytes, bytearray)) or not reply:
        raise PeerError(f"{peer_id} sent an empty reply to {name}")
    if reply[:1] == _ERR:
        raise RemoteError(f"{name} at {peer_id}: {bytes(reply[1:]).decode('utf-8', 'replace')}")
    if reply[:1] != _OK:
        raise PeerError(f"{peer_id} sent a malformed reply to {name}")
    if len(reply) - 1 > max_bytes:
        raise PeerError(f"{peer_id} sent a reply of {len(reply) - 1} bytes to {name}, limit {max_bytes}")
    return bytes(reply[1:])


def describe_failure(e: BaseException) -> str:
    """The message a caller sees for a handler's exception (our own errors speak for themselves)."""
    return str(e) if isinstance(e, SwarmlmError) else f"{type(e).__name__}: {e}"


async def run_unary(handler: UnaryHandler, peer_id: str, request: bytes, *, name: str,
                    max_request_bytes: int) -> bytes:
    """Serve one unary request: size check, call, status byte. Never raises (except cancellation)."""
    if len(request) > max_request_bytes:
        return error_reply(f"request of {len(request)} bytes exceeds the limit of {max_request_bytes}")
    try:
        reply = await handler(peer_id, request)
        if not isinstance(reply, (bytes, bytearray)):
            raise TypeError(f"handler {name} returned {type(reply).__name__}, not bytes")
        return ok_reply(bytes(reply))
    except Exception as e:
        _log_handler_failure(name, peer_id, e)
        return error_reply(describe_failure(e))


def _log_handler_failure(name: str, peer_id: str, e: Exception) -> None:
    if isinstance(e, SwarmlmError):
        logger.info("%s from %s refused: %s", name, peer_id, e)
    else:
        logger.warning("%s from %s failed", name, peer_id, exc_info=e)


# ---- stream frames -----------------------------------------------------------------------

def frame(tag: int, payload: bytes = b"") -> bytes:
    """A frame's bytes, header and payload in one piece (one write: a separate 5-byte header would
    travel as its own tiny libp2p frame, or side-channel record)."""
    return _HEADER.pack(tag, len(payload)) + payload


async def write_frame(writer: asyncio.StreamWriter, tag: int, payload: bytes = b"") -> None:
    writer.write(frame(tag, payload))
    await writer.drain()


async def read_frame(reader: asyncio.StreamReader, *, max_bytes: int) -> tuple[int, bytes]:
    """One frame; `PeerError` if the header is bad or the payload is longer than `max_bytes`."""
    header = await reader.readexactly(_HEADER.size)
    tag, length = _HEADER.unpack(header)
    if tag not in (REQUEST, DATA, END, ERROR):
        raise PeerError(f"unknown frame tag {tag}")
    limit = MAX_ERROR_BYTES if tag == ERROR else max_bytes
    if length > limit:
        raise PeerError(f"frame of {length} bytes exceeds the limit of {limit}")
    return tag, (await reader.readexactly(length) if length else b"")


async def serve_stream(handler: StreamHandler, peer_id: str, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter, *, name: str, max_request_bytes: int) -> None:
    """Serve one stream: read the REQUEST frame, send the handler's chunks, END or ERROR. Never raises."""
    try:
        try:
            tag, request = await read_frame(reader, max_bytes=max_request_bytes)
            if tag != REQUEST:
                raise PeerError(f"expected a request frame, got tag {tag}")
        except (PeerError, asyncio.IncompleteReadError) as e:
            await write_frame(writer, ERROR, str(e).encode()[:MAX_ERROR_BYTES])
            return
        try:
            async for chunk in handler(peer_id, request):
                if not isinstance(chunk, (bytes, bytearray, memoryview)):
                    raise TypeError(f"stream handler {name} yielded {type(chunk).__name__}, not bytes")
                await write_frame(writer, DATA, chunk)
        except (ConnectionError, asyncio.IncompleteReadError) as e:
            logger.debug("%s from %s: the caller went away (%s)", name, peer_id, e)
            return          # nothing to tell it
        except Exception as e:
            _log_handler_failure(name, peer_id, e)
            await write_frame(writer, ERROR, describe_failure(e).encode("utf-8", "replace")[:MAX_ERROR_BYTES])
            return
        await write_frame(writer, END)
    except (ConnectionError, asyncio.IncompleteReadError, RuntimeError) as e:
        logger.debug("%s from %s: stream closed while answering (%s)", name, peer_id, e)
    finally:
        await _linger(reader)
        writer.close()


async def _linger(reader: asyncio.StreamReader, timeout_s: float = LINGER_S) -> None:
    """Wait until the caller closes its side (it does once it has read our last frame), discarding
    what it still sends, for at most `timeout_s`. Closing first, with the caller's bytes unread
    (an oversized request it is still writing), lets the daemon reset the stream and drop our
    last frame: the caller would see a cut stream instead of our END or ERROR."""
    async def drain() -> None:
        while await reader.read(1 << 16):
            pass
    try:
        await asyncio.wait_for(drain(), timeout_s)
    except (asyncio.TimeoutError, ConnectionError, RuntimeError, OSError):
        pass


async def request_stream(reader: Any, writer: Any, request: bytes, *, peer_id: str, name: str, timeout_s: float,
                         max_chunk_bytes: int) -> AsyncIterator[bytes]:
    """The caller's side of an open stream: send the REQUEST frame, then yield `read_stream`'s chunks."""
    try:
        await asyncio.wait_for(write_frame(writer, REQUEST, request), timeout_s)
    except asyncio.TimeoutError:
        raise PeerTimeout(f"{name} at {peer_id}: request not taken in {timeout_s:.1f} s") from None
    except (ConnectionError, RuntimeError) as e:
        raise PeerError(f"{name} at {peer_id}: {e}") from None
    async for chunk in read_stream(reader, peer_id=peer_id, name=name, timeout_s=timeout_s,
                                   max_chunk_bytes=max_chunk_bytes):
        yield chunk


async def read_stream(reader: asyncio.StreamReader, *, peer_id: str, name: str, timeout_s: float,
                      max_chunk_bytes: int) -> AsyncIterator[bytes]:
    """The caller's side: DATA payloads until END; `RemoteError` on ERROR, `PeerTimeout` if a frame is late."""
    while True:
        try:
            tag, payload = await asyncio.wait_for(read_frame(reader, max_bytes=max_chunk_bytes), timeout_s)
        except asyncio.TimeoutError:
            raise PeerTimeout(f"{name} at {peer_id}: no data for {timeout_s:.1f} s") from None
        except asyncio.IncompleteReadError:
            raise PeerError(f"{name} at {peer_id}: the stream closed before it ended") from None
        except ConnectionError as e:
            raise PeerError(f"{name} at {peer_id}: {e}") from None
        except PeerError as e:
            raise PeerError(f"{name} at {peer_id}: {e}") from None
        if tag == DATA:
            yield payload
        elif tag == END:
            return
        elif tag == ERROR:
            raise RemoteError(f"{name} at {peer_id}: {payload.decode('utf-8', 'replace')}")
        else:
            raise PeerError(f"{name} at {peer_id}: unexpected frame tag {tag}")


# ---- channels: many requests and replies over one long-lived stream ------------------------

async def serve_channel(handler: UnaryHandler, peer_id: str, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter, *, name: str, max_request_bytes: int,
                        idle_timeout_s: float) -> None:
    """Serve one channel (a raw stream): every REQUEST frame gets one DATA frame (the handler's
    reply) or one ERROR frame, in order, until the caller sends END, closes, or is silent for
    `idle_timeout_s`. A handler's failure is an ERROR frame and the channel goes on; a frame
    that cannot be read (unknown tag, over `max_request_bytes`, not a REQUEST) is an ERROR frame
    and the end of the channel, since the bytes after it cannot be trusted. Never raises
    (except cancellation)."""
    try:
        while True:
            try:
                tag, request = await within(read_frame(reader, max_bytes=max_request_bytes), idle_timeout_s)
            except (asyncio.TimeoutError, asyncio.IncompleteReadError):
                return                  # idle, or the caller closed its side
            except PeerError as e:
                await write_frame(writer, ERROR, str(e).encode()[:MAX_ERROR_BYTES])
                await _linger(reader)
                return
            if tag == END:
                return
            if tag != REQUEST:
                await write_frame(writer, ERROR, f"expected a request frame, got tag {tag}".encode())
                await _linger(reader)
                return
            try:
                reply = await handler(peer_id, request)
                if not isinstance(reply, (bytes, bytearray)):
                    raise TypeError(f"handler {name} returned {type(reply).__name__}, not bytes")
            except Exception as e:
                _log_handler_failure(name, peer_id, e)
                await write_frame(writer, ERROR, describe_failure(e).encode("utf-8", "replace")[:MAX_ERROR_BYTES])
                continue
            await write_frame(writer, DATA, reply)
    except (ConnectionError, asyncio.IncompleteReadError, RuntimeError, OSError) as e:
        logger.debug("%s from %s: channel closed (%s)", name, peer_id, e)
    finally:
        writer.close()


if hasattr(asyncio, "timeout"):            # Python 3.11+: a deadline without wait_for's extra task per frame
    async def within(aw: Awaitable[Any], timeout_s: float) -> Any:
        """`aw`'s result, or `asyncio.TimeoutError` after `timeout_s`."""
        async with asyncio.timeout(timeout_s):
            return await aw
else:
    async def within(aw: Awaitable[Any], timeout_s: float) -> Any:
        return await asyncio.wait_for(aw, timeout_s)


class Channel:
    """The caller's side of a channel: `await ch.call(request, timeout_s=..., max_response_bytes=...)`.

    A request is written the moment it is made (`send` writes before it returns) and replies are
    read in the order the requests went out, which is the order a server answers them in, so
    several calls may be in flight. An ERROR reply is a `RemoteError` and the channel stays
    usable; a timeout, a cut stream, a malformed frame or a call given up on before its reply was
    read breaks it for good (a late reply would otherwise answer the next request), and every
    later call fails at once with `PeerError`.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, peer_id: str, name: str):
        self.peer_id = peer_id
        self.name = name
        self._reader = reader
        self._writer = writer
        self._last_turn: asyncio.Future | None = None   # done once the latest request's reply is read
        self.broken: str | None = None      # why the channel can no longer be used

    @property
    def reader(self) -> Any:
        """What replies are read from (a side-channel `Connection` for a direct channel)."""
        return self._reader

    async def call(self, request: bytes, *, timeout_s: float, max_response_bytes: int) -> bytes:
        """One request, one reply (see the class docstring for the errors)."""
        return await self.send(request, timeout_s=timeout_s, max_response_bytes=max_response_bytes)

    def send(self, request: bytes, *, timeout_s: float, max_response_bytes: int,
             decode: Callable[[bytes], Any] | None = None) -> Awaitable[Any]:
        """Write `request` now; await the result for its reply (as `call`'s), passed through `decode`."""
        where = f"{self.name} at {self.peer_id}"
        if self.broken is None:
            try:
                self._writer.write(_HEADER.pack(REQUEST, len(request)) + request)
            except (ConnectionError, RuntimeError, OSError) as e:
                self._break(str(e) or type(e).__name__)
        if self.broken is not None:
            return _raise(PeerError(f"{where}: the channel is broken ({self.broken})"))
        turn = asyncio.get_running_loop().create_future()
        before, self._last_turn = self._last_turn, turn
        # a task from now on: its reply is read in its turn even if nobody awaits it yet
        reply = asyncio.ensure_future(self._reply(before, where, timeout_s, max_response_bytes, decode))

        def settled(task: asyncio.Future) -> None:
            if task.cancelled():              # given up, maybe before it started: its reply stays unread
                self._break("a call was given up before its reply")
            else:
                task.exception()              # whoever awaits it still gets it; nobody else is told
            turn.set_result(None)
        reply.add_done_callback(settled)
        return reply

    async def _reply(self, before: asyncio.Future | None, where: str, timeout_s: float,
                     max_response_bytes: int, decode: Callable[[bytes], Any] | None) -> Any:
        try:
            tag, payload = await within(self._read_reply(before, where, max_response_bytes), timeout_s)
        except asyncio.TimeoutError:
            self._break(f"no reply in {timeout_s:.1f} s")
            raise PeerTimeout(f"{where}: no reply in {timeout_s:.1f} s") from None
        except asyncio.IncompleteReadError:
            self._break("the stream closed")
            raise PeerError(f"{where}: the stream closed before the reply") from None
        except PeerError:
            raise                            # the channel is broken already
        except (ConnectionError, RuntimeError, OSError) as e:
            self._break(str(e) or type(e).__name__)
            raise PeerError(f"{where}: {e}") from None
        if tag == DATA:
            return payload if decode is None else decode(payload)
        if tag == ERROR:
            raise RemoteError(f"{where}: {payload.decode('utf-8', 'replace')}")
        self._break(f"unexpected frame tag {tag}")
        raise PeerError(f"{where}: unexpected frame tag {tag}")

    async def _read_reply(self, before: asyncio.Future | None, where: str, max_response_bytes: int
                          ) -> tuple[int, bytes]:
        await self._writer.drain()
        if before is not None and not before.done():
            await asyncio.wait([before])          # not `await before`: cancelling us must not cancel it
        if self.broken is not None:
            raise PeerError(f"{where}: the channel is broken ({self.broken})")
        try:
            return await read_frame(self._reader, max_bytes=max_response_bytes)
        except PeerError as e:
            self._break(str(e))
            raise PeerError(f"{where}: {e}") from None

    async def call_message(self, request: Any, response_cls: type, *, timeout_s: float,
                           max_response_bytes: int = 1 << 20) -> Any:
        """`call` with dataclasses on both sides, as `call_message` is for unary calls."""
        return await self.send_message(request, response_cls, timeout_s=timeout_s,
                                       max_response_bytes=max_response_bytes)

    def send_message(self, request: Any, response_cls: type, *, timeout_s: float,
                     max_response_bytes: int = 1 << 20) -> Awaitable[Any]:
        """`send` with dataclasses on both sides: the request is written before this returns."""
        def decode(reply: bytes) -> Any:
            return decode_reply(reply, response_cls, peer_id=self.peer_id, name=self.name, max_bytes=max_response_bytes)
        return self.send(serialize.encode_message(request), timeout_s=timeout_s, max_response_bytes=max_response_bytes,
                         decode=decode)

    def _break(self, why: str) -> None:
        if self.broken is None:
            self.broken = why
        self._writer.close()

    def close(self) -> None:
        """Tell the server we are done (best effort) and close the stream. Idempotent."""
        if self.broken is None:
            self.broken = "closed"
            try:
                self._writer.write(_HEADER.pack(END, 0))
            except (ConnectionError, RuntimeError, OSError):
                pass
        self._writer.close()


async def _raise(error: BaseException) -> Any:
    raise error


# ---- typed messages over unary calls -----------------------------------------------------

def message_handler(request_cls: type, fn: Callable[[str, Any], Awaitable[Any]], *,
                    max_request_bytes: int = serialize.MAX_MESSAGE_BYTES) -> UnaryHandler:
    """Wrap `fn(peer_id, request: request_cls) -> dataclass` as a bytes handler for `Peer.add_handler`.

    A request that does not decode into `request_cls` gets a `WireError` reply; `fn` never sees it.
    """
    async def handle(peer_id: str, request: bytes) -> bytes:
        msg = serialize.decode_message(request, request_cls, max_bytes=max_request_bytes)
        return serialize.encode_message(await fn(peer_id, msg))
    return handle


async def call_message(peer: Any, peer_id: str, name: str, request: Any, response_cls: type, *,
                       timeout_s: float, max_response_bytes: int = 1 << 20) -> Any:
    """`peer.call` with dataclasses on both sides; a reply that does not decode is a `PeerError`."""
    reply = await peer.call(peer_id, name, serialize.encode_message(request), timeout_s=timeout_s,
                            max_response_bytes=max_response_bytes)
    return decode_reply(reply, response_cls, peer_id=peer_id, name=name, max_bytes=max_response_bytes)


def decode_reply(reply: bytes, response_cls: type, *, peer_id: str, name: str, max_bytes: int) -> Any:
    """A reply as `response_cls`; one that does not decode is the peer's fault: `PeerError`."""
    try:
        return serialize.decode_message(reply, response_cls, max_bytes=max_bytes)
    except WireError as e:
        raise PeerError(f"{peer_id} answered {name} with a malformed {response_cls.__name__}: {e}") from None
