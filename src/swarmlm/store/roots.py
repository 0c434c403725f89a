"""The files `swarmlm store add` put into a store, as it printed them: `<data_dir>/blocks/roots.json`.

    record_root(store_dir, Root(cid, name, size_bytes))   add or refresh one entry
    load_roots(store_dir) -> list[Root]                   oldest first; [] if there is no file

A store holds blocks only; this small file remembers which of them are the roots of added files,
with the CID exactly as `add` printed it (a CIDv0 stays "Qm..."), the file's name and its size,
so `store ls` can list the files apart from their inner blocks. It is written atomically (a
temporary file, then a rename) under a lock, so two `add`s on one directory keep both entries.
A damaged file is only a lost listing, never lost data: it is moved aside to `roots.json.damaged`
with a warning and a new one is started. Knows nothing of blocks or CIDs beyond their text.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from swarmlm.log import get_logger

logger = get_logger(__name__)

ROOTS_FILE = "roots.json"
MAX_NAME_CHARS = 255


@dataclass(frozen=True)
class Root:
    cid: str              # as `store add` printed it
    name: str             # the added file's name (no folder)
    size_bytes: int       # the file's size


def load_roots(store_dir: str | os.PathLike) -> list[Root]:
    """The recorded roots, oldest first; a damaged file or entry is skipped with a warning."""
    path = Path(store_dir) / ROOTS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        logger.warning("ignoring %s, which is damaged (%s); `store add` starts a new one", path, e)
        return []
    if not isinstance(data, list):
        logger.warning("ignoring %s: it holds no list of files", path)
        return []
    roots = [root for root in map(_root_of, data) if root is not None]
    if len(roots) != len(data):
        logger.warning("skipped %d damaged entries of %s", len(data) - len(roots), path)
    return roots


def record_root(store_dir: str | os.PathLike, root: Root) -> None:
    """Add `root` (or refresh the entry with its CID) to the store's list of added files."""
    path = Path(store_dir) / ROOTS_FILE
    with _locked(path):
        if path.exists() and _damaged(path):
            os.replace(path, path.with_name(ROOTS_FILE + ".damaged"))
            logger.warning("moved the damaged %s aside to %s.damaged", path, ROOTS_FILE)
        roots = [r for r in load_roots(store_dir) if r.cid != root.cid] + [root]
        tmp = path.with_name(f"{ROOTS_FILE}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps([asdict(r) for r in roots], indent=1), encoding="utf-8")
        os.replace(tmp, path)


def _root_of(entry: object) -> Root | None:
    if not isinstance(entry, dict):
        return None
    cid, name, size = entry.get("cid"), entry.get("name"), entry.get("size_bytes")
    if not (isinstance(cid, str) and 0 < len(cid) <= 128 and isinstance(name, str) and len(name) <= MAX_NAME_CHARS
            and type(size) is int and size >= 0):
        return None
    return Root(cid, name, size)


def _damaged(path: Path) -> bool:
    try:
        return not isinstance(json.loads(path.read_text(encoding="utf-8")), list)
    except (OSError, ValueError):
        return True


@contextlib.contextmanager
def _locked(path: Path):
    with open(path.with_name(ROOTS_FILE + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
