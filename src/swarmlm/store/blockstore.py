"""Blocks by CID: on disk (`BlockStore`) and in memory (`MemoryBlockStore`), with pins and GC.

Both implement one protocol:
    put(block, cid=None, *, check=True) -> Cid     get(cid) -> bytes      has(cid) -> bool
    writer() -> a context manager with the same `put`, for many blocks at once
    delete(cid) -> bool     size_bytes() -> int     iter(store) -> Cids    entries()
    pin(cid) / unpin(cid) / pinned() / is_pinned(cid)     gc(limit_bytes) -> freed bytes

On disk a block lives either loose in `<root>/<shard>/<cidv1>`, the shard being the two
characters before the CID's last one (kubo's flatfs layout), written to a temporary name and
renamed into place, so a reader never sees half a block; or in a pack file (`packs.py`) with
many others, when it was written through `store.writer()` — what `add_file` and a fetch do,
since a file per 256 KiB block costs more than hashing it. Every `get` hashes the block again: one that no
longer matches its CID (a bad disk, a crash mid-write) is logged, deleted so the exchange can
fetch it again, and raised as `IntegrityError`, never returned. A v0 and a v1 CID of the same
dag-pb block name the same stored block; iteration yields CIDv1s.

Pins and gc are the same for both stores and live in retention.py: `gc` keeps every block
reachable from a pinned root and deletes the others least recently used first. Knows nothing
of files or the network.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import threading
import time
from pathlib import Path
from typing import Iterator

from swarmlm.errors import IntegrityError, NotFoundError
from swarmlm.log import get_logger
from swarmlm.store.cid import RAW, Cid, CidError, block_matches
from swarmlm.store.packs import PackIndex, PackWriter
from swarmlm.store.retention import Entry, PinsAndGc

logger = get_logger(__name__)

PINS_FILE = "pins.json"
_TMP_MARK = ".tmp-"


class MissingBlock(NotFoundError, KeyError):
    """The local store does not hold this block."""

    def __str__(self) -> str:         # KeyError would quote the message
        return str(self.args[0]) if self.args else "missing block"


def checked_cid(block: bytes | memoryview, cid: Cid | None, check: bool) -> Cid:
    """What `put` stores `block` under: its raw CID if none is given, else `cid`, checked against
    the bytes unless the caller has just computed it from them (`check=False`)."""
    if cid is None:
        return Cid.of(block, RAW)
    if check and not block_matches(cid, block):
        raise IntegrityError(f"block of {len(block)} bytes does not match its CID {cid}")
    return cid


# ---- on disk ------------------------------------------------------------------------------

class BlockStore(PinsAndGc):
    """Blocks in files under `root_dir` (usually `<data_dir>/blocks`, see paths.py)."""

    def __init__(self, root_dir: str | os.PathLike):
        self.root = Path(root_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self._root_str = str(self.root)
        self._shards: set[str] = set()
        self._counter = itertools.count()
        self._lock = threading.Lock()
        self.packs = PackIndex(self.root)

    def __repr__(self) -> str:
        return f"BlockStore({str(self.root)!r})"

    def writer(self) -> _BlockWriter:
        """`with store.writer() as w: w.put(block, cid)`: blocks go to pack files, sealed on exit."""
        return _BlockWriter(self)

    def locate(self, cid: Cid) -> tuple[Path, int, int] | None:
        """(file, offset, length) of the stored block, or None: where to look with other tools."""
        key = cid.to_v1().encode()
        path = self.path_of(cid)
        if path.is_file():
            return path, 0, path.stat().st_size
        loc = self.packs.find(key)
        return None if loc is None else (self.packs.path(loc.pack), loc.offset, loc.length)

    def path_of(self, cid: Cid) -> Path:
        key = cid.to_v1().encode()
        return self.root / key[-3:-1] / key

    def put(self, block: bytes | memoryview, cid: Cid | None = None, *, check: bool = True) -> Cid:
        """Store `block` (as raw if no CID is given); `check=False` skips the hash when the
        caller has just computed `cid` from these very bytes. Returns the CID."""
        cid = checked_cid(block, cid, check)
        key = cid.to_v1().encode()
        shard = key[-3:-1]
        path = f"{self._root_str}/{shard}/{key}"      # plain strings: pathlib costs more than the write
        if self._present(key, len(block)):
            return cid
        if shard not in self._shards:
            with contextlib.suppress(FileExistsError):
                os.mkdir(f"{self._root_str}/{shard}")
            self._shards.add(shard)
        tmp = f"{path}{_TMP_MARK}{os.getpid()}-{next(self._counter)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(block)
            while view:
                view = view[os.write(fd, view):]
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.close(fd)
        os.replace(tmp, path)
        return cid

    def _present(self, key: str, n_bytes: int) -> bool:
        """Already stored (loose with this size, or packed): a loose one counts as used."""
        if key in self.packs._where:
            return True
        with contextlib.suppress(OSError):
            path = f"{self._root_str}/{key[-3:-1]}/{key}"
            if os.stat(path).st_size == n_bytes:
                os.utime(path)
                return True
        return False

    def get(self, cid: Cid) -> bytes:
        """The block, verified against `cid`; `MissingBlock` if absent, `IntegrityError` if corrupted
        (the bad copy is deleted first, so it can be fetched again)."""
        path = self.path_of(cid)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return self._get_packed(cid)
        if not block_matches(cid, data):
            logger.error("block %s on disk is corrupted (%d bytes at %s); deleting it", cid, len(data), path)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise IntegrityError(f"stored block {cid} is corrupted; it was deleted and must be fetched again")
        with contextlib.suppress(OSError):
            os.utime(path)
        return data

    def _get_packed(self, cid: Cid) -> bytes:
        key = cid.to_v1().encode()
        for _ in range(2):                   # a pack compacted by another process: look again
            loc = self.packs.find(key)
            if loc is None:
                break
            data = self.packs.read(loc)
            if data is None:
                continue
            if len(data) != loc.length or not block_matches(cid, data):
                logger.error("block %s in pack %s is corrupted (%d bytes at offset %d); deleting it",
                             cid, loc.pack, loc.length, loc.offset)
                self.packs.delete(key)
                raise IntegrityError(f"stored block {cid} is corrupted; it was deleted and must be fetched again")
            return data
        raise MissingBlock(f"block {cid} is not in {self.root}")

    def has(self, cid: Cid) -> bool:
        key = cid.to_v1().encode()
        if key in self.packs._where:
            return True
        return os.path.isfile(f"{self._root_str}/{key[-3:-1]}/{key}") or self.packs.find(key) is not None

    def delete(self, cid: Cid) -> bool:
        try:
            os.unlink(self.path_of(cid))
            return True
        except FileNotFoundError:
            return self.packs.delete(cid.to_v1().encode())

    def gc(self, limit_bytes: int, *, min_idle_s: float = 0.0) -> int:
        """As `PinsAndGc.gc`; then packs holding deleted blocks are rewritten without them, and
        packs left by interrupted writes are removed, so the disk shrinks too."""
        freed = super().gc(limit_bytes, min_idle_s=min_idle_s)
        for pack, _ in self.packs.packs_with_dead_blocks():
            self.packs.compact(pack, lambda key, data: block_matches(Cid.parse(key), data))
        self.packs.remove_orphans()
        return freed

    def entries(self) -> Iterator[Entry]:
        used: dict[str, float] = {}                  # one stat per pack, not per block
        for key, loc in self.packs.items():
            if loc.pack not in used:
                used[loc.pack] = self.packs.last_used(loc.pack)
            try:
                yield Entry(Cid.parse(key), loc.length, used[loc.pack])
            except CidError:
                continue
        for shard in os.scandir(self.root):
            if not shard.is_dir(follow_symlinks=False) or len(shard.name) != 2:
                continue
            for item in os.scandir(shard.path):
                if _TMP_MARK in item.name:
                    continue
                try:
                    cid = Cid.parse(item.name)
                    st = item.stat(follow_symlinks=False)
                except (CidError, OSError):
                    continue                 # not ours, or deleted meanwhile
                yield Entry(cid, st.st_size, st.st_mtime_ns / 1e9)

    def __iter__(self) -> Iterator[Cid]:
        return (e.cid for e in self.entries())

    def size_bytes(self) -> int:
        return sum(e.size_bytes for e in self.entries())

    def _recent_cutoff(self, min_idle_s: float) -> float:
        return time.time() - min_idle_s if min_idle_s > 0 else float("inf")

    # pins: a JSON list of CID strings, replaced atomically, under a file lock so that a node
    # and a `swarmlm store` command on the same directory do not lose each other's pins
    @contextlib.contextmanager
    def _pins_lock(self):
        with self._lock, open(self.root / (PINS_FILE + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _load_pins(self) -> list[str]:
        path = self.root / PINS_FILE
        try:
            pins = json.loads(path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as e:
            raise IntegrityError(f"{path} is unreadable ({e}); fix or remove it") from None
        if not isinstance(pins, list) or not all(isinstance(p, str) for p in pins):
            raise IntegrityError(f"{path} must hold a JSON list of CIDs")
        return pins

    def _save_pins(self, pins: list[str]) -> None:
        path = self.root / PINS_FILE
        tmp = path.with_name(f"{PINS_FILE}{_TMP_MARK}{os.getpid()}-{next(self._counter)}")
        tmp.write_text(json.dumps(pins, indent=1))
        os.replace(tmp, path)


class _BlockWriter:
    """`BlockStore.writer()`: the store's `put`, into pack files; a context manager."""

    def __init__(self, store: BlockStore):
        self.store = store
        self._packs = PackWriter(store.packs)

    def put(self, block: bytes | memoryview, cid: Cid | None = None, *, check: bool = True) -> Cid:
        cid = checked_cid(block, cid, check)
        key = cid.to_v1().encode()
        if not self.store._present(key, len(block)):
            self._packs.put_run([key], block, [len(block)])
        return cid

    def put_run(self, run: bytes | memoryview, cids: list[Cid], lengths: list[int]) -> None:
        """Store consecutive blocks given as one buffer (their bytes back to back), already hashed
        by the caller: one write, unless some are stored already (then one by one)."""
        keys = [cid.to_v1().encode() for cid in cids]
        if any(self.store._present(key, n) for key, n in zip(keys, lengths)):
            view, at = memoryview(run), 0
            for cid, n in zip(cids, lengths):
                self.put(view[at:at + n], cid, check=False)
                at += n
            return
        self._packs.put_run(keys, run, lengths)

    def close(self) -> None:
        self._packs.close()

    def __enter__(self) -> _BlockWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- in memory ----------------------------------------------------------------------------

class MemoryBlockStore(PinsAndGc):
    """The same protocol in a dict; `last_used` is a counter, not a clock. For tests."""

    def __init__(self):
        self.blocks: dict[Cid, bytes] = {}
        self._used: dict[Cid, int] = {}
        self._clock = itertools.count()
        self._pins: list[str] = []
        self._lock = threading.Lock()

    def put(self, block: bytes | memoryview, cid: Cid | None = None, *, check: bool = True) -> Cid:
        cid = checked_cid(block, cid, check)
        key = cid.to_v1()
        self.blocks[key] = bytes(block)
        self._used[key] = next(self._clock)
        return cid

    def get(self, cid: Cid) -> bytes:
        key = cid.to_v1()
        if key not in self.blocks:
            raise MissingBlock(f"block {cid} is not in the memory store")
        data = self.blocks[key]
        if not block_matches(cid, data):
            logger.error("block %s in memory is corrupted; deleting it", cid)
            self.delete(cid)
            raise IntegrityError(f"stored block {cid} is corrupted; it was deleted and must be fetched again")
        self._used[key] = next(self._clock)
        return data

    def has(self, cid: Cid) -> bool:
        return cid.to_v1() in self.blocks

    def writer(self) -> contextlib.nullcontext:
        """Many blocks at once: in memory, the store itself."""
        return contextlib.nullcontext(self)

    def delete(self, cid: Cid) -> bool:
        self._used.pop(cid.to_v1(), None)
        return self.blocks.pop(cid.to_v1(), None) is not None

    def entries(self) -> Iterator[Entry]:
        return iter([Entry(c, len(b), float(self._used[c])) for c, b in self.blocks.items()])

    def __iter__(self) -> Iterator[Cid]:
        return iter(list(self.blocks))

    def size_bytes(self) -> int:
        return sum(len(b) for b in self.blocks.values())

    @contextlib.contextmanager
    def _pins_lock(self):
        with self._lock:
            yield

    def _load_pins(self) -> list[str]:
        return list(self._pins)

    def _save_pins(self, pins: list[str]) -> None:
        self._pins = list(pins)
