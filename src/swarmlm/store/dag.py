"""Files as DAGs of blocks, the way `ipfs add` builds them, and reading them back verified.

    add_file(store, path_or_file, *, cid_version=1) -> Cid     the root CID IPFS prints
    iter_file(source, root) -> Iterator[bytes]                  the file's bytes, every block checked
    list_blocks(source, root) -> Iterator[Cid]                  every CID under root, root first
    children(source, cid), file_size(source, cid)

Building: fixed-size chunks (256 KiB), leaves raw (v1) or dag-pb UnixFS File nodes (v0), the
balanced layout with at most 174 links a node. Leaves are grouped in order in runs of 174,
each run gets a parent (a run of one too), and so on upwards until one node is left; a file of
one chunk or less is its own root. The builder keeps only a list of pending links per level
(< 174 each), so memory stays at one read buffer whatever the file size.

A `source` is anything that gives a block by CID: a block store (its `get`) or a plain
function `get_block(cid) -> bytes`, such as the exchange's remote fetch. Every block is checked
against its CID here, whoever supplied it.

The short helpers at the end (`open_store`, `read_block`, `write_block`, `pin`, ...) are the
functional face of a block store that the exchange and the node use.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Union

from swarmlm.errors import UserError, WireError
from swarmlm.store import paths
from swarmlm.store.blockstore import BlockStore, MissingBlock
from swarmlm.store.cid import DAG_JSON, DAG_PB, RAW, Cid, block_matches, verify
from swarmlm.store.unixfs import FILE, RAW_TYPE, decode_node, decode_unixfs, file_leaf, file_node, links_of

CHUNK_BYTES = 262_144     # kubo's default chunker, size-262144
MAX_LINKS = 174           # kubo's balanced layout: 8192 / 47 links a node
READ_BYTES = 16 << 20     # one read from the file: 64 chunks
RUN_BYTES = 4 << 20       # chunks hashed and written by one worker task (one write into a pack)
MAX_DEPTH = 32            # far beyond any real file (174^32 chunks)
WORKERS = min(4, (os.cpu_count() or 1) + 1)   # threads hashing and writing leaves (one more than cores: one may wait on the disk)

BlockSource = Union[Callable[[Cid], bytes], object]   # a store with .get, or get_block itself
Link = tuple[Cid, int, int]                            # (cid, tsize: DAG bytes, file bytes under it)

__all__ = ["add_file", "add_bytes", "iter_file", "read_file", "list_blocks", "children", "file_size",
           "open_store", "store_root", "parse_cid", "block_matches", "read_block", "write_block", "pin",
           "unpin", "pinned_roots", "collect_garbage", "writer", "Cid", "CHUNK_BYTES", "MAX_LINKS"]


# ---- building -----------------------------------------------------------------------------

class _Balanced:
    """Pending links per level; a full level becomes a parent node one level up."""

    def __init__(self, store, version: int, max_links: int):
        self.store, self.version, self.max_links = store, version, max_links
        self.levels: list[list[Link]] = [[]]

    def add(self, link: Link, level: int = 0) -> None:
        while len(self.levels) <= level:
            self.levels.append([])
        self.levels[level].append(link)
        if len(self.levels[level]) == self.max_links:
            self.add(self._parent(self.levels[level]), level + 1)
            self.levels[level] = []

    def _parent(self, links: list[Link]) -> Link:
        block = file_node(links)
        cid = Cid.of(block, DAG_PB, self.version)
        self.store.put(block, cid, check=False)
        return cid, len(block) + sum(t for _, t, _ in links), sum(n for _, _, n in links)

    def finish(self) -> Link:
        level = 0
        while True:
            pending = self.levels[level]
            top = level == len(self.levels) - 1
            if top and len(pending) == 1:
                return pending[0]
            if pending:
                self.add(self._parent(pending), level + 1)   # a run of one gets a parent too
                self.levels[level] = []
            level += 1


def _runs(f: BinaryIO, chunk_bytes: int, run_chunks: int) -> Iterator[memoryview]:
    """The file in runs of `run_chunks` whole chunks (a last run may be shorter and end in a
    short chunk; an empty file gives one empty run), read in large pieces and sliced without
    copying."""
    run_bytes = chunk_bytes * run_chunks
    read_bytes = max(run_bytes, READ_BYTES // run_bytes * run_bytes)
    carry = b""
    produced = False
    while True:
        piece = f.read(read_bytes - len(carry))
        if not piece:
            break
        if carry:
            piece, carry = carry + piece, b""
        view = memoryview(piece)
        whole = len(view) // chunk_bytes * chunk_bytes
        for start in range(0, whole, run_bytes):
            produced = True
            yield view[start:min(start + run_bytes, whole)]
        carry = bytes(view[whole:])           # a short read (pipe): keep the tail for the next one
    if carry or not produced:
        yield memoryview(carry)


def _leaves(store, run: memoryview, chunk_bytes: int, version: int) -> list[Link]:
    """Hash and store a run of chunks as leaves: raw (v1), written with one `put_run` where the
    store has it (the run's bytes are the leaves' bytes, back to back), or dag-pb UnixFS Files (v0)."""
    chunks = [run[i:i + chunk_bytes] for i in range(0, len(run), chunk_bytes)] or [run]
    if version == 0:
        links = []
        for chunk in chunks:
            leaf = file_leaf(chunk)
            links.append((store.put(leaf, Cid.of(leaf, DAG_PB, 0), check=False), len(leaf), len(chunk)))
        return links
    cids = [Cid.of(chunk, RAW, 1) for chunk in chunks]
    put_run = getattr(store, "put_run", None)
    if put_run is not None:
        put_run(run, cids, [len(c) for c in chunks])
    else:
        for chunk, cid in zip(chunks, cids):
            store.put(chunk, cid, check=False)
    return [(cid, len(c), len(c)) for cid, c in zip(cids, chunks)]


def add_file(store, src: str | os.PathLike | BinaryIO, *, cid_version: int = 1,
             chunk_bytes: int = CHUNK_BYTES, max_links: int = MAX_LINKS, workers: int = WORKERS) -> Cid:
    """Put the blocks of a file into `store`; returns the root CID `ipfs add` prints for it
    (`--cid-version=1`: raw leaves, CIDv1; `cid_version=0`: plain `ipfs add`).

    Leaves are hashed and written by `workers` threads (hashlib and file writes release the
    GIL) while this one reads ahead; at most a few read buffers are in flight at once."""
    if cid_version not in (0, 1):
        raise UserError(f"--cid-version must be 0 or 1, got {cid_version}")
    if chunk_bytes < 1 or max_links < 2:
        raise UserError("chunk_bytes must be >= 1 and max_links >= 2")
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if path.is_dir():
            raise UserError(f"{path} is a directory; add the files in it one at a time")
        if not path.is_file():
            raise UserError(f"no such file: {path}")
        with open(path, "rb", buffering=0) as f:
            return add_file(store, f, cid_version=cid_version, chunk_bytes=chunk_bytes, max_links=max_links,
                            workers=workers)
    with writer(store) as sink:
        return _add(sink, src, cid_version, chunk_bytes, max_links, workers)


def writer(store):
    """The store's bulk writer (`store.writer()`, a context manager with `put`), or the store
    itself for a store without one."""
    make = getattr(store, "writer", None)
    return make() if callable(make) else contextlib.nullcontext(store)


def _add(store, src: BinaryIO, cid_version: int, chunk_bytes: int, max_links: int, workers: int) -> Cid:
    tree = _Balanced(store, cid_version, max_links)
    run_chunks = max(1, RUN_BYTES // chunk_bytes)
    if workers <= 1 or chunk_bytes < 65536:          # tiny chunks: threads would cost more than they save
        for run in _runs(src, chunk_bytes, run_chunks):
            for link in _leaves(store, run, chunk_bytes, cid_version):
                tree.add(link)
        return tree.finish()[0]
    max_pending = max(2 * workers, 2 * READ_BYTES // (chunk_bytes * run_chunks))    # about two read buffers
    with ThreadPoolExecutor(workers, thread_name_prefix="store-add") as pool:
        pending: deque[Future] = deque()
        try:
            for run in _runs(src, chunk_bytes, run_chunks):
                pending.append(pool.submit(_leaves, store, run, chunk_bytes, cid_version))
                while len(pending) > max_pending or (pending and pending[0].done()):
                    for link in pending.popleft().result():          # leaves join the tree in order
                        tree.add(link)
            while pending:
                for link in pending.popleft().result():
                    tree.add(link)
        finally:
            for future in pending:
                future.cancel()
    return tree.finish()[0]


def add_bytes(store, data: bytes, **options) -> Cid:
    """`add_file` of bytes in memory."""
    import io
    return add_file(store, io.BytesIO(data), **options)


# ---- reading ------------------------------------------------------------------------------

def _getter(source: BlockSource) -> Callable[[Cid], bytes]:
    get = getattr(source, "get", None)
    if callable(get):
        return get
    if callable(source):
        return source
    raise TypeError("a block source is a store with .get(cid) or a function get_block(cid) -> bytes")


def _verified(get: Callable[[Cid], bytes], cid: Cid) -> bytes:
    block = get(cid)
    verify(cid, block)
    return block


def iter_file(source: BlockSource, root: Cid) -> Iterator[bytes]:
    """The bytes of the file under `root`, in order, each block verified against its CID and
    each node's sizes checked against what its children hold. `IntegrityError` on a block that
    does not match its CID, `WireError` on a node that is not a UnixFS file."""
    yield from _walk(_getter(source), root, None, 0)


read_file = iter_file


def _walk(get: Callable[[Cid], bytes], cid: Cid, expected: int | None, depth: int) -> Iterator[bytes]:
    if depth > MAX_DEPTH:
        raise WireError(f"DAG deeper than {MAX_DEPTH} levels at {cid}")
    block = _verified(get, cid)
    if cid.codec == RAW:
        if expected is not None and len(block) != expected:
            raise WireError(f"raw block {cid} holds {len(block)} bytes, its parent says {expected}")
        yield block
        return
    if cid.codec != DAG_PB:
        raise UserError(f"{cid} is not a file (codec dag-json: a manifest?)")
    node = decode_node(block)
    if node.data is None:
        raise WireError(f"dag-pb node {cid} has no UnixFS data")
    fs = decode_unixfs(node.data)
    if fs.type not in (FILE, RAW_TYPE):
        raise UserError(f"{cid} is not a file (UnixFS type {fs.type})")
    if node.links and len(fs.blocksizes) != len(node.links):
        raise WireError(f"node {cid} has {len(node.links)} links but {len(fs.blocksizes)} blocksizes")
    total = len(fs.data) + sum(fs.blocksizes)
    if fs.filesize is not None and fs.filesize != total:
        raise WireError(f"node {cid} says filesize {fs.filesize} but holds {total} bytes")
    if expected is not None and total != expected:
        raise WireError(f"node {cid} holds {total} bytes, its parent says {expected}")
    if fs.data:
        yield fs.data
    for link, size in zip(node.links, fs.blocksizes):
        yield from _walk(get, link.cid, size, depth + 1)


def children(source: BlockSource, cid: Cid) -> list[Cid]:
    """The CIDs `cid` links to (none for a raw block, which is not even read)."""
    if cid.codec == RAW:
        return []
    return links_of(cid, _verified(_getter(source), cid))


def list_blocks(source: BlockSource, root: Cid) -> Iterator[Cid]:
    """Every CID of the DAG under `root`, depth first, root first, children in link order.
    Reads the blocks that may have links (not raw leaves)."""
    get = _getter(source)
    stack = [root]
    while stack:
        cid = stack.pop()
        yield cid
        if cid.codec != RAW:
            stack.extend(reversed(links_of(cid, _verified(get, cid))))


def file_size(source: BlockSource, cid: Cid) -> int:
    """Content bytes under `cid`: a raw block's length, a UnixFS node's filesize, or for a
    dag-json block (a manifest) the sum over what it links to. Reads the root only."""
    block = _verified(_getter(source), cid)
    if cid.codec == RAW:
        return len(block)
    if cid.codec == DAG_JSON:
        return sum(file_size(source, child) for child in links_of(cid, block))
    node = decode_node(block)
    fs = decode_unixfs(node.data or b"")
    return fs.filesize if fs.filesize is not None else len(fs.data) + sum(fs.blocksizes)


# ---- the functional face of a block store (used by exchange.py and node.py) ----------------

parse_cid = Cid.parse


def open_store(data_dir: str | os.PathLike | None = None) -> BlockStore:
    """The block store of a data directory (`paths.data_dir` resolves None)."""
    return BlockStore(paths.blocks_dir(data_dir))


def store_root(store: BlockStore) -> Path:
    return store.root


def read_block(store, cid: Cid) -> bytes | None:
    """The verified block, or None if absent; `IntegrityError` if the stored copy was corrupted
    (it is deleted first, so it can be fetched again)."""
    try:
        return store.get(cid)
    except MissingBlock:
        return None


def write_block(store, cid: Cid, block: bytes) -> None:
    """Store a block received from elsewhere; `IntegrityError` if it does not match `cid`."""
    store.put(block, cid)


def pin(store, cid: Cid) -> None:
    store.pin(cid)


def unpin(store, cid: Cid) -> bool:
    return store.unpin(cid)


def pinned_roots(store) -> list[Cid]:
    return store.pinned()


def collect_garbage(store, limit_bytes: int, *, min_idle_s: float = 0.0) -> int:
    """Delete unpinned blocks, least recently used first, until the store holds <= limit_bytes."""
    return store.gc(limit_bytes, min_idle_s=min_idle_s)
