"""Corpora: which text files to read and how they split into train and validation.

The embedded default is the Python standard library's own `.py` files, found through
`sysconfig`, so every machine with Python has the same corpus. Any directory of text files
or a single file works too. The split is by file and deterministic (a hash of the relative
path), so every peer agrees on it without talking. A single file is split by bytes instead.
Knows nothing of tokens or models.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from swarmlm.errors import DataError
from swarmlm.log import get_logger

log = get_logger(__name__)

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", ".git"}
MAX_FILE_BYTES = 8 * 1024 * 1024    # larger files are skipped: generated data, not prose or code


@dataclass(frozen=True)
class Document:
    name: str        # path relative to the corpus root: the split key, stable across machines
    text: str


@dataclass(frozen=True)
class Corpus:
    root: Path                    # a directory, or the single file
    files: tuple[Path, ...]       # sorted, absolute
    val_percent: float = 5.0      # share of files (or of a single file's bytes) held out

    @property
    def name(self) -> str:
        return "stdlib" if self.root == stdlib_root() else str(self.root)

    def fingerprint(self) -> str:
        """Changes when any file is added, removed or modified: keys the token cache."""
        h = hashlib.sha256(f"{self.root}|{self.val_percent}".encode())
        for f in self.files:
            st = f.stat()
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]

    def documents(self, split: str) -> Iterator[Document]:
        """The readable UTF-8 documents of `split` ("train" or "val"); bad files are skipped with a warning."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be train or val, not {split!r}")
        if self.root.is_file():
            text = _read_text(self.root)
            if text is None:
                return
            cut = int(len(text) * (1 - self.val_percent / 100))
            cut = text.rfind("\n", 0, cut) + 1 or cut     # split on a line boundary
            yield Document(self.root.name, text[:cut] if split == "train" else text[cut:])
            return
        for f in self.files:
            rel = f.relative_to(self.root).as_posix()
            if (split == "val") != is_validation(rel, self.val_percent):
                continue
            text = _read_text(f)
            if text is not None:
                yield Document(rel, text)


def is_validation(relative_path: str, val_percent: float) -> bool:
    """Deterministic split by file: a hash of the path, not the order of a directory listing."""
    bucket = int.from_bytes(hashlib.sha256(relative_path.encode()).digest()[:4], "big") % 10_000
    return bucket < val_percent * 100


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def open_corpus(path: str | os.PathLike | None = None, *, val_percent: float = 5.0) -> Corpus:
    """The corpus at `path` (a file or a directory), or the Python standard library when None."""
    if path is None:
        root = stdlib_root()
        files = _walk(root, suffixes=(".py",))
    else:
        root = Path(path).expanduser().resolve()
        if not root.exists():
            raise DataError(f"data path {path} does not exist")
        if root.is_file():
            files = [root]
        elif root.is_dir():
            files = _walk(root, suffixes=None)
        else:
            raise DataError(f"data path {path} is neither a file nor a directory")
    if not files:
        raise DataError(f"no text files under {root}")
    if not 0 <= val_percent < 100:
        raise DataError(f"val_percent must be in [0, 100), not {val_percent}")
    return Corpus(root, tuple(files), val_percent)


def _walk(root: Path, suffixes: tuple[str, ...] | None) -> list[Path]:
    out = []
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in _SKIP_DIRS and not x.startswith("."))
        for n in sorted(names):
            if n.startswith(".") or (suffixes and not n.endswith(suffixes)):
                continue
            p = Path(d) / n
            if p.is_file():
                out.append(p)
    return sorted(out)


def _read_text(path: Path) -> str | None:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            log.warning("skipping %s: larger than %d bytes", path, MAX_FILE_BYTES)
            return None
        data = path.read_bytes()
    except OSError as e:
        log.warning("skipping %s: unreadable (%s)", path, e.strerror or e)
        return None
    if b"\0" in data[:8192]:
        log.warning("skipping %s: binary file", path)
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        log.warning("skipping %s: not UTF-8 text", path)
        return None
