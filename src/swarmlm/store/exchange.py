"""Block exchange, the wire: blocks by CID over libp2p streams and the side channel, served and asked for.

`BlockService` adds to a `Peer`:
    swarmlm/blocks/1   libp2p stream  BlockRequest -> one chunk per CID, in order: 0x00+block | 0x01+reason
    swarmlm/has/1      libp2p unary   HasRequest   -> HasReply
    "store/blocks"     side-channel purpose (p2p/channel): the same frames as the blocks stream, every
                       frame one AES-256-GCM record; requests one after another on one connection
Every request is checked before any work (types, batch size, CID syntax, size limits); a bad
one gets an error reply and the service goes on. A block that fails its hash on our own disk
is reported and never sent. The side channel exists because p2pd's streams cap a transfer well
below what hashing and the disk allow; a fetcher that cannot open it uses the libp2p stream.
Blocks are encrypted there like everything else, though each is checked against its CID anyway:
against the same records in the clear, bench/store_get.py finds encryption costs a transfer
1-10% of its throughput (about 5% typically) and about 10% more CPU: short of the 15% that a
plain mode would need.

`side_replies` is the asking end of one request on a side-channel connection: each reply frame
is one record, and a block is handed on as a view into its decrypted record (no copy).
Fetching whole DAGs from many providers (Fetcher, fetch_dag, get_file) is fetch.py; those
names still import from here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Sequence

from swarmlm import serialize
from swarmlm.errors import IntegrityError, PeerError, PeerTimeout, RemoteError, WireError
from swarmlm.log import get_logger
from swarmlm.p2p import rpc
from swarmlm.store import dag

logger = get_logger(__name__)

BLOCKS = "swarmlm/blocks/1"
HAS = "swarmlm/has/1"
PURPOSE = "store/blocks"            # the side-channel purpose that serves BLOCKS requests

MAX_BATCH = 64                      # CIDs in one request
MAX_BLOCK_BYTES = 2 * 1024 * 1024   # bitswap's limit too; our chunks are 256 KiB
MAX_REQUEST_BYTES = 64 * 1024       # a request is CIDs only
MAX_CID_CHARS = 128
FOUND, MISSING = b"\x00", b"\x01"   # the first byte of each reply chunk
REPLY_RECORD_BYTES = rpc.frame_bytes(MAX_BLOCK_BYTES + 1)    # the largest reply frame, one side-channel record
SIDE_IDLE_S = 60.0                  # a side-channel connection with no next request in this long is closed
_FRAME = struct.Struct(">BI")       # rpc.py's frame header: tag, payload length
_READ_AHEAD = 4                     # blocks a server reads and hashes per worker hand-off, a group ahead


# ---- wire messages ---------------------------------------------------------------------------

@dataclass(frozen=True)
class BlockRequest:
    cids: list[str]           # 1..MAX_BATCH CID strings, answered in this order
    max_block_bytes: int      # the largest block the caller accepts, 1..MAX_BLOCK_BYTES


@dataclass(frozen=True)
class HasRequest:
    cids: list[str]           # 1..MAX_BATCH CID strings


@dataclass(frozen=True)
class HasReply:
    have: list[bool]          # one per requested CID


def check_cids(cids: Sequence[Any]) -> list[dag.Cid]:
    """Parse a request's CID list; `WireError` on an empty or oversized list or a malformed CID."""
    if not 1 <= len(cids) <= MAX_BATCH:
        raise WireError(f"a request names 1..{MAX_BATCH} CIDs, got {len(cids)}")
    out = []
    for text in cids:
        if not isinstance(text, str) or len(text) > MAX_CID_CHARS:
            raise WireError(f"malformed CID {str(text)[:MAX_CID_CHARS]!r}")
        out.append(dag.parse_cid(text))
    return out


# ---- serving ---------------------------------------------------------------------------------

class BlockService:
    """Serves the blocks of a block store to the swarm. `await BlockService(peer, store).start()`."""

    def __init__(self, peer: Any, store: Any, *, side_channel: bool = True):
        self.peer = peer
        self.store = store
        self.side_channel = side_channel   # also serve blocks over the peer's side channel
        self.closed = False
        self.served_blocks = 0             # counters, for logs and tests
        self.refused_requests = 0
        self.served_bytes = 0

    async def start(self) -> None:
        await self.peer.add_stream_handler(BLOCKS, self.rpc_blocks, max_request_bytes=MAX_REQUEST_BYTES)
        await self.peer.add_handler(HAS, self.rpc_has, max_request_bytes=MAX_REQUEST_BYTES)
        if self.side_channel:
            try:
                side = await self.peer.side_channel()
                await side.serve(PURPOSE, self._serve_side, max_record_bytes=rpc.frame_bytes(MAX_REQUEST_BYTES))
            except (PeerError, OSError, ValueError) as e:
                logger.warning("blocks go over libp2p streams only: no side channel (%s)", e)

    async def close(self) -> None:
        """Take no more side-channel connections (the peer's side channel itself is the peer's)."""
        self.closed = True

    async def _serve_side(self, conn: Any) -> None:
        """Blocks requests over one side-channel connection, one after another, each answered with
        the frames of a libp2p stream (DATA per CID, then END or ERROR), until the fetcher closes
        it or falls silent; after an ERROR the connection ends."""
        while not self.closed:
            try:
                tag, request = await rpc.within(rpc.read_frame(conn, max_bytes=MAX_REQUEST_BYTES), SIDE_IDLE_S)
                if tag != rpc.REQUEST:
                    raise PeerError(f"expected a request frame, got tag {tag}")
            except (asyncio.TimeoutError, asyncio.IncompleteReadError):
                return
            except PeerError as e:
                await rpc.write_frame(conn, rpc.ERROR, str(e).encode()[:rpc.MAX_ERROR_BYTES])
                return
            try:
                async with contextlib.aclosing(self.rpc_blocks(conn.peer_id, request, framed=True)) as frames:
                    async for frame in frames:
                        conn.write(frame)                # one frame, one record
                        await conn.drain()
            except WireError as e:
                logger.info("%s (side channel) from %s refused: %s", BLOCKS, conn.peer_id, e)
                await rpc.write_frame(conn, rpc.ERROR, str(e).encode("utf-8", "replace")[:rpc.MAX_ERROR_BYTES])
                return
            await rpc.write_frame(conn, rpc.END)

    async def rpc_blocks(self, peer_id: str, request: bytes, *, framed: bool = False) -> AsyncIterator[bytes]:
        """One reply chunk per requested CID; `framed`: each as a whole DATA frame (built in one copy)."""
        try:
            req = serialize.decode_message(request, BlockRequest, max_bytes=MAX_REQUEST_BYTES)
            if not 0 < req.max_block_bytes <= MAX_BLOCK_BYTES:
                raise WireError(f"max_block_bytes must be in 1..{MAX_BLOCK_BYTES}, got {req.max_block_bytes}")
            cids = check_cids(req.cids)
        except WireError:
            self.refused_requests += 1
            raise
        # disk reads and hashes run in a worker thread, a group of blocks per hand-off, one group
        # ahead of the one being sent
        groups = [cids[i:i + _READ_AHEAD] for i in range(0, len(cids), _READ_AHEAD)]
        ahead = asyncio.ensure_future(asyncio.to_thread(self._read_blocks, groups[0]))
        try:
            for n, group in enumerate(groups):
                blocks = await ahead
                if n + 1 < len(groups):
                    ahead = asyncio.ensure_future(asyncio.to_thread(self._read_blocks, groups[n + 1]))
                for cid, data in zip(group, blocks):
                    yield self._reply(cid, data, req.max_block_bytes, framed)
        finally:
            ahead.cancel()

    def _read_blocks(self, cids: list[dag.Cid]) -> list[bytes | None]:
        return [self._read_block(c) for c in cids]

    def _reply(self, cid: dag.Cid, data: bytes | None, max_block_bytes: int, framed: bool) -> bytes:
        if data is None:
            parts = [MISSING, f"block {cid} not found".encode()]
        elif len(data) > max_block_bytes:
            parts = [MISSING, f"block {cid} has {len(data)} bytes, over the caller's limit".encode()]
        else:
            self.served_blocks += 1
            self.served_bytes += len(data)
            parts = [FOUND, data]
        if framed:
            parts.insert(0, _FRAME.pack(rpc.DATA, len(parts[0]) + len(parts[1])))
        return b"".join(parts)

    async def rpc_has(self, peer_id: str, request: bytes) -> bytes:
        req = serialize.decode_message(request, HasRequest, max_bytes=MAX_REQUEST_BYTES)
        cids = check_cids(req.cids)
        have = await asyncio.to_thread(lambda: [self.store.has(c) for c in cids])
        return serialize.encode_message(HasReply(have=have))

    def _read_block(self, cid: dag.Cid) -> bytes | None:
        """The verified block, or None if we lack it or our copy is corrupted (reported, then dropped)."""
        try:
            return dag.read_block(self.store, cid)
        except IntegrityError as e:
            logger.error("not serving %s: %s", cid, e)
            return None


# ---- asking over the side channel -----------------------------------------------------------

async def side_replies(conn: Any, request: bytes, *, peer_id: str, timeout_s: float,
                       reuse: Callable[[Any], None]) -> AsyncIterator[memoryview]:
    """A blocks request over a side-channel connection: rpc.py's frames, each frame one record,
    each DATA payload a view into its record. A connection whose reply ended cleanly goes to
    `reuse` (for the next request); any other is closed."""
    name = f"{BLOCKS} (side channel) at {peer_id}"
    ended = False
    try:
        if conn.is_closing():
            raise PeerError(f"{name}: the connection closed between requests")
        conn.write(_FRAME.pack(rpc.REQUEST, len(request)) + request)
        while True:
            tag, payload = await _read_frame(conn, name=name, timeout_s=timeout_s)
            if tag == rpc.DATA:
                yield payload
            elif tag == rpc.END:
                ended = True
                return
            elif tag == rpc.ERROR:
                raise RemoteError(f"{name}: {bytes(payload).decode('utf-8', 'replace')}")
            else:
                raise PeerError(f"{name}: unexpected frame tag {tag}")
    finally:
        if ended:
            reuse(conn)
        else:
            conn.close()


async def _read_frame(conn: Any, *, name: str, timeout_s: float) -> tuple[int, memoryview]:
    """One frame, from one record (rpc.read_frame over the connection's byte stream would copy
    a 256 KiB block twice more: measured, about 5% of the CPU a transfer takes)."""
    try:
        record = memoryview(await rpc.within(conn.read_record(), timeout_s))
    except asyncio.TimeoutError:
        raise PeerTimeout(f"{name}: no data for {timeout_s:.1f} s") from None
    except asyncio.IncompleteReadError:
        raise PeerError(f"{name}: the connection closed before the reply ended") from None
    except (PeerError, ConnectionError, OSError) as e:
        raise PeerError(f"{name}: {e}") from None
    if len(record) < _FRAME.size:
        raise PeerError(f"{name}: a record of {len(record)} bytes is no frame")
    tag, length = _FRAME.unpack_from(record)
    if length != len(record) - _FRAME.size:
        raise PeerError(f"{name}: a frame of {length} bytes in a record of {len(record)}")
    return tag, record[_FRAME.size:]

