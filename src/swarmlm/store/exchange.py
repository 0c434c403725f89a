"""Block exchange: serve blocks by CID over Peer streams, and fetch DAGs from several providers.

Serving (`BlockService`): RPCs on a `Peer`:
    swarmlm/blocks/1         stream  BlockRequest -> one chunk per CID, in order: 0x00+block | 0x01+reason
    swarmlm/has/1            unary   HasRequest   -> HasReply
    swarmlm/blocks-direct/1  unary   (empty)      -> direct.Offer: a TCP address and ticket
Every request is checked before any work (types, batch size, CID syntax, size limits); a bad
one gets an error reply and the service goes on. A block that fails its hash on our own disk
is reported and never sent. The direct offer (p2p/direct.py) serves the same `blocks` requests
over a plain TCP connection, one request per connection: p2pd's streams cap a transfer well
below what hashing and the disk allow, and blocks need no transport integrity since each is
checked against its CID. A caller that cannot dial it uses the libp2p stream.

Fetching (`fetch_dag`): walk the DAG level by level (root, inner nodes, leaves), asking the
providers in parallel, a batch of CIDs per stream. Every block is checked against its CID
before it is stored. A provider that sends a bad block is banned for the rest of the fetch
and named in the log; a missing block or a broken stream sends the CIDs not yet received
to another provider. Blocks already verified are kept in the local store, so nothing is
fetched twice, also across runs. `get_file` then writes the file from the local store to a
temp file and renames it into place, so a failed fetch leaves no output file.

Knows nothing of models or manifests; manifest.py passes `get_block` functions built here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterable, Sequence

from swarmlm import serialize
from swarmlm.errors import IntegrityError, NotFoundError, PeerError, WireError
from swarmlm.log import get_logger
from swarmlm.p2p import direct, rpc
from swarmlm.store import dag
from swarmlm.store.providers import find_providers, rank_providers

logger = get_logger(__name__)

BLOCKS = "swarmlm/blocks/1"
HAS = "swarmlm/has/1"
DIRECT = "swarmlm/blocks-direct/1"

MAX_BATCH = 64                      # CIDs in one request
MAX_BLOCK_BYTES = 2 * 1024 * 1024   # bitswap's limit too; our chunks are 256 KiB
MAX_REQUEST_BYTES = 64 * 1024       # a request is CIDs only
MAX_CID_CHARS = 128
_FOUND, _MISSING = b"\x00", b"\x01"
_WRITES_IN_FLIGHT = 4               # blocks being hashed and written while the next ones arrive
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

    def __init__(self, peer: Any, store: Any, *, direct: bool = True):
        self.peer = peer
        self.store = store
        self.direct = direct            # also offer blocks over direct TCP connections
        self.listener: direct.DirectListener | None = None
        self.served_blocks = 0          # counters, for logs and tests
        self.refused_requests = 0

    async def start(self) -> None:
        await self.peer.add_stream_handler(BLOCKS, self.rpc_blocks, max_request_bytes=MAX_REQUEST_BYTES)
        await self.peer.add_handler(HAS, self.rpc_has, max_request_bytes=MAX_REQUEST_BYTES)
        hosts = direct.maddr_hosts(self.peer.maddrs)
        if self.direct and hosts:
            self.listener = await direct.DirectListener.start(hosts[0], self._serve_direct)
            await self.peer.add_handler(DIRECT, self.rpc_direct, max_request_bytes=16)

    async def close(self) -> None:
        if self.listener is not None:
            await self.listener.close()
            self.listener = None

    async def rpc_direct(self, peer_id: str, request: bytes) -> bytes:
        if self.listener is None:
            raise WireError("this peer offers no direct connections")
        return serialize.encode_message(self.listener.offer(peer_id))

    async def _serve_direct(self, peer_id: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await rpc.serve_stream(self.rpc_blocks, peer_id, reader, writer, name=f"{BLOCKS} (direct)",
                               max_request_bytes=MAX_REQUEST_BYTES)

    async def rpc_blocks(self, peer_id: str, request: bytes) -> AsyncIterator[bytes]:
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
                    yield self._reply(cid, data, req.max_block_bytes)
        finally:
            ahead.cancel()

    def _read_blocks(self, cids: list[dag.Cid]) -> list[bytes | None]:
        return [self._read_block(c) for c in cids]

    def _reply(self, cid: dag.Cid, data: bytes | None, max_block_bytes: int) -> bytes:
        if data is None:
            return _MISSING + f"block {cid} not found".encode()
        if len(data) > max_block_bytes:
            return _MISSING + f"block {cid} has {len(data)} bytes, over the caller's limit".encode()
        self.served_blocks += 1
        return _FOUND + data

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


# ---- fetching --------------------------------------------------------------------------------

@dataclass
class FetchStats:
    """What a fetch did: blocks and bytes per provider, and whom it banned."""
    blocks_by_peer: dict[str, int] = field(default_factory=dict)
    bytes_by_peer: dict[str, int] = field(default_factory=dict)
    already_local: int = 0
    banned: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def fetched_blocks(self) -> int:
        return sum(self.blocks_by_peer.values())

    @property
    def fetched_bytes(self) -> int:
        return sum(self.bytes_by_peer.values())


@dataclass(frozen=True)
class FetchOptions:
    batch: int = 32                   # CIDs per stream request (8 MiB of 256 KiB leaves)
    streams_per_provider: int = 3     # requests in flight per provider, so one is always queued
    timeout_s: float = 30.0           # opening a stream, and the wait for each block
    max_failures: int = 2             # broken streams before a provider is dropped for this fetch
    direct: bool = True               # ask providers for a direct TCP connection (p2p/direct.py)


class _Provider:
    def __init__(self, peer_id: str):
        self.peer_id = peer_id
        self.lacks: set[str] = set()
        self.in_flight = 0
        self.failures = 0
        self.banned = False
        self.offer: asyncio.Future | None = None     # -> direct.Offer, or None: libp2p streams only


class Fetcher:
    """Fetches sets of CIDs into a store from a list of providers; one instance per DAG fetch.

    `on_block(n_bytes)` is called after each verified block (progress bars). Blocks are written
    through `sink` (a `store.writer()`), or the store's own `put`.
    """

    def __init__(self, peer: Any, store: Any, providers: Sequence[str], *, options: FetchOptions = FetchOptions(),
                 on_block: Callable[[int], None] | None = None, sink: Any = None):
        self.peer = peer
        self.store = store
        self.sink = store if sink is None else sink
        self.options = options
        self.providers = {p: _Provider(p) for p in providers if p != peer.peer_id}
        self.stats = FetchStats()
        self.on_block = on_block

    async def fetch(self, cids: Iterable[dag.Cid]) -> None:
        """Fetch every CID not already in the store; raise if some cannot be had from anyone."""
        queue: deque[dag.Cid] = deque()
        for cid in cids:
            if self.store.has(cid):
                self.stats.already_local += 1
            else:
                queue.append(cid)
        tasks: dict[asyncio.Task, _Provider] = {}
        try:
            while queue or tasks:
                for prov in self._usable():
                    while prov.in_flight < self.options.streams_per_provider:
                        batch = self._take_batch(queue, prov)
                        if not batch:
                            break
                        prov.in_flight += 1
                        tasks[asyncio.create_task(self._fetch_batch(prov, batch))] = prov
                if not tasks:
                    break
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    prov = tasks.pop(task)
                    prov.in_flight -= 1
                    queue.extend(task.result())       # CIDs this provider did not deliver go back
        finally:
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
        if queue:
            self._fail(queue)

    def _usable(self) -> list[_Provider]:
        return [p for p in self.providers.values()
                if not p.banned and p.failures < self.options.max_failures]

    def _take_batch(self, queue: deque, prov: _Provider) -> list[dag.Cid]:
        batch, keep = [], []
        while queue and len(batch) < self.options.batch:
            cid = queue.popleft()
            (keep if str(cid) in prov.lacks else batch).append(cid)
        queue.extendleft(reversed(keep))
        return batch

    async def _fetch_batch(self, prov: _Provider, batch: list[dag.Cid]) -> list[dag.Cid]:
        """Ask `prov` for `batch`; store what verifies; return the CIDs not stored.

        Each block is hashed and written in a worker thread while the next one arrives (the
        store's `put` checks it against its CID: one hash per block).
        """
        request = serialize.encode_message(BlockRequest(cids=[str(c) for c in batch],
                                                        max_block_bytes=MAX_BLOCK_BYTES))
        received = 0
        writes: list[tuple[dag.Cid, int, asyncio.Future]] = []
        try:
            async with contextlib.aclosing(await self._open(prov, request)) as chunks:
                async for chunk in chunks:
                    if received >= len(batch):
                        raise PeerError("sent more blocks than were asked for")
                    cid = batch[received]
                    received += 1
                    if chunk[:1] == _MISSING:
                        prov.lacks.add(str(cid))
                        continue
                    if chunk[:1] != _FOUND:
                        self._ban(prov, f"sent a malformed reply for {cid}")
                        break
                    writes.append((cid, len(chunk) - 1, asyncio.ensure_future(
                        asyncio.to_thread(self._store_block, cid, memoryview(chunk)[1:]))))
                    if len(writes) > _WRITES_IN_FLIGHT and not await writes[-_WRITES_IN_FLIGHT - 1][2]:
                        break               # a bad block: stop reading from this provider
            if received < len(batch) and not prov.banned:
                raise PeerError(f"answered {received} of {len(batch)} CIDs")
            prov.failures = 0
        except PeerError as e:
            prov.failures += 1
            logger.warning("provider %s failed after %d of %d blocks: %s", prov.peer_id, received, len(batch), e)
        finally:
            stored = await self._settle(prov, writes)
        return [c for c in batch if str(c) not in stored]

    async def _open(self, prov: _Provider, request: bytes) -> AsyncIterator[bytes]:
        """The reply chunks of one blocks request: over the provider's direct offer if it made
        one that we can dial, else over a libp2p stream."""
        if self.options.direct and prov.offer is None:
            prov.offer = asyncio.ensure_future(self._ask_offer(prov.peer_id))
        offer = await prov.offer if self.options.direct else None
        if offer is not None:
            try:
                reader, writer = await direct.connect(offer, self.peer.peer_id, timeout_s=self.options.timeout_s)
                return _direct_chunks(reader, writer, request, peer_id=prov.peer_id, timeout_s=self.options.timeout_s)
            except PeerError as e:
                logger.info("provider %s: no direct connection (%s); using libp2p streams", prov.peer_id, e)
                prov.offer = _done(None)
        return self.peer.call_stream(prov.peer_id, BLOCKS, request, timeout_s=self.options.timeout_s,
                                     max_chunk_bytes=MAX_BLOCK_BYTES + 1)

    async def _ask_offer(self, peer_id: str) -> direct.Offer | None:
        try:
            reply = await self.peer.call(peer_id, DIRECT, b"", timeout_s=self.options.timeout_s,
                                         max_response_bytes=direct.MAX_TICKET_BYTES)
            return direct.check_offer(serialize.decode_message(reply, direct.Offer, max_bytes=direct.MAX_TICKET_BYTES))
        except (PeerError, WireError) as e:
            logger.debug("provider %s makes no direct offer: %s", peer_id, e)
            return None

    def _store_block(self, cid: dag.Cid, data: memoryview) -> bool:
        try:
            dag.write_block(self.sink, cid, data)
            return True
        except IntegrityError:
            return False

    async def _settle(self, prov: _Provider, writes: list[tuple[dag.Cid, int, asyncio.Future]]) -> set[str]:
        """Wait for the block writes of one batch; count the good ones, ban on a bad one."""
        results = await asyncio.gather(*(f for _, _, f in writes), return_exceptions=True)
        stored = set()
        for (cid, n_bytes, _), ok in zip(writes, results):
            if ok is True:
                stored.add(str(cid))
                self._count(prov, n_bytes)
            elif isinstance(ok, BaseException) and not isinstance(ok, asyncio.CancelledError):
                logger.error("storing block %s failed: %s", cid, ok)
            elif ok is False:
                self._ban(prov, f"served a block that does not match its CID {cid}")
        return stored

    def _count(self, prov: _Provider, n_bytes: int) -> None:
        s = self.stats
        s.blocks_by_peer[prov.peer_id] = s.blocks_by_peer.get(prov.peer_id, 0) + 1
        s.bytes_by_peer[prov.peer_id] = s.bytes_by_peer.get(prov.peer_id, 0) + n_bytes
        if self.on_block is not None:
            self.on_block(n_bytes)

    def _ban(self, prov: _Provider, why: str) -> None:
        if prov.banned:
            return                      # another of its streams got there first
        prov.banned = True
        self.stats.banned.append(prov.peer_id)
        logger.warning("banning peer %s: %s", prov.peer_id, why)

    def _fail(self, queue: Sequence[dag.Cid]) -> None:
        example = str(queue[0])
        if not self.providers:
            raise NotFoundError(f"no provider for {example}")
        if all(p.banned for p in self.providers.values()):
            raise IntegrityError(f"every provider served corrupted blocks ({', '.join(self.stats.banned)}); "
                                 f"{len(queue)} blocks missing, e.g. {example}")
        raise NotFoundError(f"{len(queue)} blocks could not be fetched from any of {len(self.providers)} "
                            f"providers, e.g. {example}")


def _done(value: Any) -> asyncio.Future:
    future = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


async def _direct_chunks(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes, *,
                         peer_id: str, timeout_s: float) -> AsyncIterator[bytes]:
    """A blocks request over a direct connection: the same frames as on a libp2p stream."""
    try:
        async for chunk in rpc.request_stream(reader, writer, request, peer_id=peer_id, name=f"{BLOCKS} (direct)",
                                              timeout_s=timeout_s, max_chunk_bytes=MAX_BLOCK_BYTES + 1):
            yield chunk
    finally:
        writer.close()


async def fetch_dag(peer: Any, root: str | dag.Cid, store: Any, *, providers: Sequence[str] | None = None,
                    options: FetchOptions = FetchOptions(), on_block: Callable[[int], None] | None = None
                    ) -> FetchStats:
    """Make every block under `root` present and verified in `store`; providers from the DHT if not given."""
    start = time.monotonic()
    root = dag.parse_cid(str(root)) if isinstance(root, str) else root
    if providers is None:
        found = await find_providers(peer, str(root))
        providers = rank_providers(str(root), [p.peer_id for p in found], me=peer.peer_id)
    with dag.writer(store) as sink:                # verified blocks go to a pack, kept even if the fetch fails
        fetcher = Fetcher(peer, store, providers, options=options, on_block=on_block, sink=sink)
        level = [root]
        while level:
            await fetcher.fetch(level)
            level = list(dict.fromkeys(child for cid in level for child in dag.children(store, cid)))  # dedupe
    fetcher.stats.seconds = time.monotonic() - start
    return fetcher.stats


async def get_file(peer: Any, root: str, store: Any, out: str | os.PathLike | None, *,
                   providers: Sequence[str] | None = None, options: FetchOptions = FetchOptions(),
                   progress: bool = False, total_bytes: int | None = None) -> FetchStats:
    """Fetch the file under `root` and write it to `out` (atomically) or to stdout.

    `progress` shows a bar on stderr (of `total_bytes`, when the provider records tell it).
    """
    cid = dag.parse_cid(root)
    bar = _progress_bar(progress, total_bytes)
    try:
        stats = await fetch_dag(peer, cid, store, providers=providers, options=options,
                                on_block=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    await asyncio.to_thread(write_file, store, cid, out)
    return stats


def write_file(store: Any, root: dag.Cid, out: str | os.PathLike | None) -> None:
    """Stream the file under `root` from `store` (each block verified again) to `out` or stdout."""
    if out is None:
        for piece in dag.iter_file(store, root):
            sys.stdout.buffer.write(piece)
        sys.stdout.buffer.flush()
        return
    out = Path(out)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for piece in dag.iter_file(store, root):
                f.write(piece)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _progress_bar(enabled: bool, total_bytes: int | None):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total_bytes or None, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                desc="fetching", leave=False)
