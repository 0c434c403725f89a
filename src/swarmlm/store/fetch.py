"""Block exchange, the fetching side: a DAG from several providers, every block verified.

`fetch_dag` walks the DAG level by level (root, inner nodes, leaves), asking the providers in
parallel, a batch of CIDs per request (exchange.py's `BlockRequest`): over the provider's side
channel (p2p/channel: encrypted, dialed only at the address the provider announced itself)
where it can be opened, else over a libp2p stream; the frames are the same both ways. Every
block is checked against its CID before it is stored. A provider that sends a bad block is
banned for the rest of the fetch and named in the log; a missing block or a broken connection
sends the CIDs not yet received to another provider. Blocks already verified are kept in the
local store, so nothing is fetched twice, also across runs. `get_file` then writes the file
from the local store to a temp file and renames it into place, so a failed fetch leaves no
output file.

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
from swarmlm.errors import IntegrityError, NotFoundError, PeerError
from swarmlm.log import get_logger
from swarmlm.store import dag
from swarmlm.store.exchange import (BLOCKS, FOUND, MAX_BLOCK_BYTES, MISSING, PURPOSE, REPLY_RECORD_BYTES,
                                    BlockRequest, side_replies)
from swarmlm.store.providers import find_providers, rank_providers

logger = get_logger(__name__)

_WRITE_GROUP = 4                    # received blocks handed to a worker thread at a time (to hash and write)
_WRITES_IN_FLIGHT = 2               # groups being hashed and written while the next ones arrive


@dataclass
class FetchStats:
    """What a fetch did: blocks and bytes per provider, and whom it banned."""
    blocks_by_peer: dict[str, int] = field(default_factory=dict)
    bytes_by_peer: dict[str, int] = field(default_factory=dict)
    already_local: int = 0
    side_channel_blocks: int = 0      # of the fetched blocks, those that came over a side channel
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
    batch: int = 32                   # CIDs per request (8 MiB of 256 KiB leaves)
    streams_per_provider: int = 3     # requests in flight per provider, so one is always queued
    timeout_s: float = 30.0           # opening a stream, and the wait for each block
    max_failures: int = 2             # broken streams before a provider is dropped for this fetch
    side_channel: bool = True         # ask over the provider's side channel where it can be opened
    side_open_timeout_s: float = 5.0  # past this, a provider's side channel counts as closed: libp2p


class _Provider:
    def __init__(self, peer_id: str):
        self.peer_id = peer_id
        self.lacks: set[str] = set()
        self.in_flight = 0
        self.failures = 0
        self.banned = False
        self.side_channel = True      # until opening it fails: then libp2p streams only, for this fetch
        self.idle: list[Any] = []     # its side-channel connections between two requests


class Fetcher:
    """Fetches sets of CIDs into a store from a list of providers; one instance per DAG fetch.

    `on_block(n_bytes)` is called after each verified block (progress bars). Blocks are written
    through `sink` (a `store.writer()`), or the store's own `put`. A provider's side-channel
    connections carry one request after another and are closed when `fetch` returns.
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
            for prov in self.providers.values():
                while prov.idle:
                    prov.idle.pop().close()
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

        Blocks are hashed and written in a worker thread, a few at a time, while the next ones
        arrive (the store's `put` checks each against its CID: one hash per block).
        """
        request = serialize.encode_message(BlockRequest(cids=[str(c) for c in batch],
                                                        max_block_bytes=MAX_BLOCK_BYTES))
        received = 0
        group: list[tuple[dag.Cid, memoryview]] = []
        writes: list[tuple[list[tuple[dag.Cid, int]], asyncio.Future]] = []

        def write_group() -> None:
            writes.append(([(cid, len(data)) for cid, data in group],
                           asyncio.ensure_future(asyncio.to_thread(self._store_blocks, list(group)))))
            group.clear()
        over_side = False
        try:
            replies, over_side = await self._open(prov, request)
            async with contextlib.aclosing(replies) as chunks:
                async for chunk in chunks:
                    if received >= len(batch):
                        raise PeerError("sent more blocks than were asked for")
                    cid = batch[received]
                    received += 1
                    if chunk[:1] == MISSING:
                        prov.lacks.add(str(cid))
                        continue
                    if chunk[:1] != FOUND:
                        self._ban(prov, f"sent a malformed reply for {cid}")
                        break
                    group.append((cid, memoryview(chunk)[1:]))
                    if len(group) == _WRITE_GROUP:
                        write_group()
                        if len(writes) > _WRITES_IN_FLIGHT and not all(await writes[-_WRITES_IN_FLIGHT - 1][1]):
                            break           # a bad block: stop reading from this provider
            if received < len(batch) and not prov.banned:
                raise PeerError(f"answered {received} of {len(batch)} CIDs")
            prov.failures = 0
        except PeerError as e:
            prov.failures += 1
            logger.warning("provider %s failed after %d of %d blocks: %s", prov.peer_id, received, len(batch), e)
        finally:
            if group:
                write_group()
            stored = await self._settle(prov, writes)
            self.stats.side_channel_blocks += len(stored) if over_side else 0
        return [c for c in batch if str(c) not in stored]

    async def _open(self, prov: _Provider, request: bytes) -> tuple[AsyncIterator[Any], bool]:
        """The reply chunks of one blocks request, and whether they come over the provider's side
        channel (if it can be opened) rather than a libp2p stream."""
        if self.options.side_channel and prov.side_channel:
            try:
                conn = prov.idle.pop() if prov.idle else await self._open_side(prov)
                return side_replies(conn, request, peer_id=prov.peer_id, timeout_s=self.options.timeout_s,
                                    reuse=prov.idle.append), True
            except (PeerError, OSError, ValueError) as e:
                if prov.side_channel:
                    logger.info("provider %s: no side channel (%s); using libp2p streams", prov.peer_id, e)
                prov.side_channel = False
        return self.peer.call_stream(prov.peer_id, BLOCKS, request, timeout_s=self.options.timeout_s,
                                     max_chunk_bytes=MAX_BLOCK_BYTES + 1), False

    async def _open_side(self, prov: _Provider) -> Any:
        side = await self.peer.side_channel()
        return await side.open(prov.peer_id, PURPOSE, timeout_s=self.options.side_open_timeout_s,
                               max_record_bytes=REPLY_RECORD_BYTES)

    def _store_blocks(self, blocks: list[tuple[dag.Cid, memoryview]]) -> list[bool]:
        """Whether each block matched its CID (and was written)."""
        ok = []
        for cid, data in blocks:
            try:
                dag.write_block(self.sink, cid, data)
                ok.append(True)
            except IntegrityError:
                ok.append(False)
        return ok

    async def _settle(self, prov: _Provider, writes: list[tuple[list[tuple[dag.Cid, int]], asyncio.Future]]
                      ) -> set[str]:
        """Wait for the block writes of one batch; count the good ones, ban on a bad one."""
        results = await asyncio.gather(*(f for _, f in writes), return_exceptions=True)
        stored = set()
        for (blocks, _), oks in zip(writes, results):
            if isinstance(oks, BaseException):
                if not isinstance(oks, asyncio.CancelledError):
                    logger.error("storing blocks %s... failed: %s", blocks[0][0], oks)
                continue
            for (cid, n_bytes), ok in zip(blocks, oks):
                if ok:
                    stored.add(str(cid))
                    self._count(prov, n_bytes)
                else:
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


# ---- whole DAGs and files ------------------------------------------------------------------------

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
