"""Pack files: many blocks in one file, for bulk writes (`add_file`, a fetch).

    <blocks>/packs/<id>.pack    the blocks, back to back
    <blocks>/packs/<id>.idx     JSON {"version": 1, "entries": [[cidv1, offset, length], ...]}
    <blocks>/packs/<id>.dead    CIDs deleted since the pack was sealed, one per line

Creating, writing and renaming one file per 256 KiB block costs more than hashing it on ext4
(0.3-1 ms a file on this machine's disk, against 0.2 ms to hash the block), so bulk writes
go through a `PackWriter`: blocks are appended to one open pack file — each `put` reserves its
range under a lock, then `pwrite`s outside it, so several hashing threads write at once — and
the pack is sealed every `PACK_BYTES` and on close: its index is written to a temporary name
and renamed into place. The index is what makes a pack exist: other processes see its blocks
once it is sealed, a pack without an index (a crash mid-write) names nothing and is removed by
garbage collection. The store that owns the writer sees each block as soon as it is written.

Reads hash every block as loose ones do; a corrupted packed block is deleted like a loose one
(its CID goes to the `.dead` list) so it can be fetched again. A pack whose blocks are all
deleted is removed; garbage collection rewrites packs that hold deleted blocks (`compact`),
holding the index's lock: a lookup that misses waits for it, so a block being moved is found
in its new pack, and a read of a pack removed meanwhile tells its caller to look again.
Knows nothing of CIDs beyond their string form; `blockstore.py` does the hashing.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

from swarmlm.log import get_logger

logger = get_logger(__name__)

PACKS_DIR = "packs"
PACK_BYTES = 64 << 20          # a writer seals its pack and starts a new one past this size
ORPHAN_AGE_S = 600.0           # a pack without an index, untouched this long, is a crash's leftover
_VERSION = 1
_OPEN_FDS = 64                 # read descriptors kept open (least recently opened closed first)
_RETIRE_S = 10.0               # a descriptor let go stays open this long for reads in flight
_ids = itertools.count()


class Location(NamedTuple):
    pack: str        # pack id: the file name without its suffix
    offset: int      # bytes from the start of the pack
    length: int


@dataclass
class _Pack:
    keys: set[str] = field(default_factory=set)      # live CIDv1s in this pack
    dead: int = 0                                     # entries deleted since it was sealed


class PackIndex:
    """Where every packed block lives, for one block store; thread-safe.

    Loaded from the `.idx` files at start and again whenever the packs directory changes and
    a lookup misses (another process sealed a pack)."""

    def __init__(self, root: Path):
        self.dir = root / PACKS_DIR
        self._where: dict[str, Location] = {}
        self._packs: dict[str, _Pack] = {}
        self._seen_idx: set[str] = set()
        self._dir_mtime = -1
        self._fds: dict[str, int] = {}
        self._retired: list[tuple[float, int]] = []      # (when, fd): closed after _RETIRE_S
        self._touched: dict[str, float] = {}
        self._lock = threading.RLock()
        self.refresh()

    # ---- lookups ---------------------------------------------------------------------------

    def find(self, key: str) -> Location | None:
        loc = self._where.get(key)
        if loc is None:
            self.refresh()
            with self._lock:        # a compaction moving this block holds the lock until it is indexed again
                loc = self._where.get(key)
        return loc

    def items(self) -> list[tuple[str, Location]]:
        self.refresh()
        with self._lock:
            return list(self._where.items())

    def path(self, pack: str, suffix: str = ".pack") -> Path:
        return self.dir / f"{pack}{suffix}"

    def last_used(self, pack: str) -> float:
        with contextlib.suppress(OSError):
            return os.stat(self.path(pack)).st_mtime_ns / 1e9
        return 0.0

    def read(self, loc: Location) -> bytes | None:
        """The stored bytes (unverified), or None if the pack is gone (another process compacted
        it: the index is refreshed, so a second `find` may point elsewhere)."""
        try:
            data = os.pread(self._fd(loc.pack), loc.length, loc.offset)
        except FileNotFoundError:
            self._forget_pack(loc.pack)
            self._dir_mtime = -1
            self.refresh()
            return None
        self._touch(loc.pack)
        return data

    # ---- changes ---------------------------------------------------------------------------

    def add(self, key: str, loc: Location) -> None:
        with self._lock:
            if key in self._where:
                return
            self._where[key] = loc
            self._packs.setdefault(loc.pack, _Pack()).keys.add(key)

    def delete(self, key: str) -> bool:
        """Forget `key`; remember it in the pack's `.dead` list; remove a pack left empty. (In a
        pack still being written, forgetting is enough: its writer indexes only what is known.)"""
        with self._lock:
            loc = self._where.pop(key, None)
            if loc is None:
                return False
            pack = self._packs[loc.pack]
            pack.keys.discard(key)
            pack.dead += 1
            if f"{loc.pack}.idx" not in self._seen_idx:
                return True
            if pack.keys:
                with open(self.path(loc.pack, ".dead"), "a") as f:
                    f.write(key + "\n")
            else:
                self.remove_pack(loc.pack)
            return True

    def remove_pack(self, pack: str) -> None:
        with self._lock:
            self._forget_pack(pack)
            for suffix in (".idx", ".pack", ".dead"):          # the index first: it makes the pack exist
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path(pack, suffix))

    def packs_with_dead_blocks(self) -> list[tuple[str, list[tuple[str, Location]]]]:
        """(pack, its live entries) for every sealed pack that holds deleted blocks."""
        with self._lock:
            return [(p, [(k, self._where[k]) for k in sorted(info.keys)])
                    for p, info in self._packs.items() if info.dead and f"{p}.idx" in self._seen_idx]

    def compact(self, pack: str, check: Callable[[str, bytes], bool]) -> int:
        """Rewrite `pack` without its deleted blocks (and without any that fail `check`); the new
        pack is sealed before the old one is removed. Returns the bytes the old file shrank by."""
        with self._lock:
            info = self._packs.get(pack)
            live = [(k, self._where[k]) for k in sorted(info.keys)] if info else []
            old_size = os.stat(self.path(pack)).st_size
            kept = 0
            with PackWriter(self) as writer:
                for key, loc in live:
                    data = self.read(loc)
                    self._where.pop(key, None)          # the writer indexes the new place
                    info.keys.discard(key)
                    if data is None or len(data) != loc.length or not check(key, data):
                        logger.error("dropping block %s from pack %s while compacting: it is corrupted", key, pack)
                        continue
                    writer.put_run([key], data, [loc.length])
                    kept += loc.length
            self.remove_pack(pack)
            return old_size - kept

    def remove_orphans(self, max_age_s: float = ORPHAN_AGE_S) -> int:
        """Remove pack files without an index that nobody has written for `max_age_s`."""
        removed = 0
        now = time.time()
        with contextlib.suppress(FileNotFoundError):
            for item in os.scandir(self.dir):
                pack, suffix = os.path.splitext(item.name)
                if suffix != ".pack" or os.path.exists(self.path(pack, ".idx")) or pack in self._packs:
                    continue
                with contextlib.suppress(OSError):
                    if now - item.stat().st_mtime > max_age_s:
                        os.unlink(item.path)
                        removed += 1
                        logger.info("removed %s: a pack without an index (an interrupted write)", item.name)
        return removed

    def refresh(self) -> bool:
        """Load indexes sealed since the last look; True if any was new."""
        try:
            mtime = os.stat(self.dir).st_mtime_ns
        except FileNotFoundError:
            return False
        if mtime == self._dir_mtime:
            return False
        with self._lock:
            # a directory's mtime ticks coarsely (a few ms): one changed less than a second ago may
            # change again without its mtime moving, so it is listed again next time
            self._dir_mtime = mtime if time.time_ns() - mtime > 1_000_000_000 else -1
            new = False
            for name in sorted(os.listdir(self.dir)):
                if name.endswith(".idx") and name not in self._seen_idx:
                    self._seen_idx.add(name)
                    new |= self._load(name[:-len(".idx")])
            return new

    def _load(self, pack: str) -> bool:
        try:
            doc = json.loads(self.path(pack, ".idx").read_text())
            entries = doc["entries"] if doc.get("version") == _VERSION else None
            if not isinstance(entries, list):
                raise ValueError(f"version {doc.get('version')!r}, not {_VERSION}")
            dead = set()
            with contextlib.suppress(FileNotFoundError):
                dead = set(self.path(pack, ".dead").read_text().split())
            loaded = False
            for key, offset, length in entries:
                if not (isinstance(key, str) and isinstance(offset, int) and isinstance(length, int)):
                    raise ValueError(f"bad entry {[key, offset, length]!r}")
                if key in dead:
                    self._packs.setdefault(pack, _Pack()).dead += 1
                elif key not in self._where:
                    self.add(key, Location(pack, offset, length))
                    loaded = True
            return loaded
        except FileNotFoundError:
            return False                     # removed meanwhile
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            logger.warning("ignoring pack index %s: %s", self.path(pack, ".idx"), e)
            return False

    def _forget_pack(self, pack: str) -> None:
        with self._lock:
            info = self._packs.pop(pack, None)
            for key in (info.keys if info else ()):
                self._where.pop(key, None)
            fd = self._fds.pop(pack, None)
            if fd is not None:
                self._retire(fd)

    def _fd(self, pack: str) -> int:
        with self._lock:
            fd = self._fds.get(pack)
            if fd is None:
                if len(self._fds) >= _OPEN_FDS:
                    self._retire(self._fds.pop(next(iter(self._fds))))
                fd = self._fds[pack] = os.open(self.path(pack), os.O_RDONLY)
            return fd

    def _retire(self, fd: int) -> None:
        """Close `fd` only after a grace period: a reader on another thread may have it in hand
        (closed at once, its number could be reused by another file mid-read). An unlinked
        pack stays readable through it meanwhile."""
        now = time.monotonic()
        self._retired.append((now, fd))
        while self._retired and now - self._retired[0][0] > _RETIRE_S:
            os.close(self._retired.pop(0)[1])

    def _touch(self, pack: str) -> None:
        """Mark the pack used (its mtime: garbage collection evicts least recently used first),
        at most once a second."""
        now = time.monotonic()
        if now - self._touched.get(pack, -2.0) > 1.0:
            self._touched[pack] = now
            with contextlib.suppress(OSError):
                os.utime(self.path(pack))

    def close(self) -> None:
        with self._lock:
            for fd in [*self._fds.values(), *(fd for _, fd in self._retired)]:
                os.close(fd)
            self._fds.clear()
            self._retired.clear()


class PackWriter:
    """Appends blocks to pack files of one store; use as a context manager (`close` seals).

    `put_run(keys, data, lengths)` is safe from several threads: offsets are reserved under a
    lock and the bytes written outside it. A failed write leaves its range unnamed (never indexed)."""

    def __init__(self, index: PackIndex, *, pack_bytes: int | None = None):
        self.index = index
        self.pack_bytes = pack_bytes or PACK_BYTES
        self._lock = threading.Lock()
        self._pack: str | None = None
        self._fd = -1
        self._size = 0
        self._writing = 0
        self._entries: list[list] = []
        self.sealed: list[str] = []

    def put_run(self, keys: list[str], data: bytes | memoryview, lengths: list[int]) -> None:
        """Append blocks given back to back in `data` (`lengths[i]` bytes for `keys[i]`) with one
        write; a block another thread packed meanwhile is indexed once."""
        with self._lock:
            if self._pack is None:
                self._open()
            pack, fd, offset = self._pack, self._fd, self._size
            self._size += len(data)
            self._writing += 1
        ok = False
        try:
            view = memoryview(data)
            at = offset
            while view:
                n = os.pwrite(fd, view, at)
                view, at = view[n:], at + n
            ok = True
        finally:
            with self._lock:
                self._writing -= 1
                at = offset
                for key, length in zip(keys, lengths):
                    if ok and key not in self.index._where:
                        self._entries.append([key, at, length])
                        self.index.add(key, Location(pack, at, length))
                    at += length
                if self._size >= self.pack_bytes and self._writing == 0:
                    self._seal()

    def close(self) -> None:
        with self._lock:
            if self._pack is not None:
                self._seal()

    def __enter__(self) -> PackWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _open(self) -> None:
        self.index.dir.mkdir(exist_ok=True)
        self._pack = f"{time.time_ns():x}-{os.getpid()}-{next(_ids)}"
        self._fd = os.open(self.index.path(self._pack), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._size, self._entries = 0, []

    def _seal(self) -> None:
        """Write the pack's index atomically (it makes the pack visible to other processes)."""
        pack = self._pack
        entries = [e for e in self._entries if self.index._where.get(e[0]) == Location(pack, e[1], e[2])]
        os.close(self._fd)
        self._pack, self._fd, self._size, self._entries = None, -1, 0, []
        if not entries:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.index.path(pack))
            return
        idx = self.index.path(pack, ".idx")
        tmp = idx.with_name(f"{idx.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"version": _VERSION, "entries": entries}, separators=(",", ":")))
        os.replace(tmp, idx)
        with self.index._lock:
            self.index._seen_idx.add(idx.name)
        self.sealed.append(pack)
