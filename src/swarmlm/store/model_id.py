"""The id servers, MPC parties and clients agree on for a model, and how MODEL on a command line is read.

- a checkpoint directory: `dir-` + the SHA-256 of config.json and its safetensors files (names
  and bytes), so a client only uses peers holding byte-identical weights. The hash is kept in
  `<data dir>/model-ids.json` keyed by path, size and mtime, so it is computed once;
- a model manifest CID (store/manifest.py): the id is the CID itself.

Pure apart from reading the files and the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from swarmlm.errors import CheckpointError
from swarmlm.store.paths import data_dir as home_dir

_HASH_CACHE = "model-ids.json"


def _weight_files(directory: Path) -> list[Path]:
    files = sorted(p for p in directory.iterdir() if p.suffix == ".safetensors" or p.name.endswith(".index.json"))
    return [directory / "config.json", *files]


def directory_model_id(directory: str | os.PathLike, *, cache_dir: Path | None = None) -> str:
    """`dir-<sha256>` over config.json and the safetensors files (names and bytes)."""
    directory = Path(directory).resolve()
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory} has no config.json")
    files = _weight_files(directory)
    stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    cache_file = (cache_dir or home_dir()) / _HASH_CACHE
    cache: dict[str, Any] = {}
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        pass
    hit = cache.get(str(directory)) if isinstance(cache, dict) else None
    if isinstance(hit, dict) and hit.get("stamp") == stamp and isinstance(hit.get("id"), str):
        return hit["id"]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
        h.update(b"\0")
    model_id = "dir-" + h.hexdigest()[:40]
    try:
        cache = cache if isinstance(cache, dict) else {}
        cache[str(directory)] = {"stamp": stamp, "id": model_id}
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_file)
    except OSError:
        pass                      # the cache only saves time
    return model_id


def looks_like_cid(text: str) -> bool:
    from swarmlm.store.cid import Cid
    try:
        Cid.parse(text)
    except Exception:
        return False
    return True
