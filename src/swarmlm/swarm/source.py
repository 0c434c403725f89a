"""Where a served or used model comes from, and the id servers and clients agree on.

MODEL on the command line is either a checkpoint directory or a model manifest CID:

- a directory: its id is `dir-` + the SHA-256 of config.json and its safetensors files, so a
  client only uses servers holding byte-identical weights. The hash is kept in
  `$SWARMLM_HOME/model-ids.json` keyed by path, size and mtime, so it is computed once.
- a manifest CID: the id is the CID itself; only the parts a process needs (its blocks, or
  the embeddings and head for a client) are fetched from the swarm's store, each block
  checked against its CID (store/manifest.py), into `<data_dir>/models/<cid>/<part>`.

Knows nothing of sessions or routing.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from swarmlm.errors import CheckpointError, UserError
from swarmlm.model.config import ModelConfig
from swarmlm.model.transformer import Transformer

_HASH_CACHE = "model-ids.json"


def home_dir(data_dir: str | os.PathLike | None = None) -> Path:
    if data_dir is not None:
        return Path(data_dir).expanduser()
    return Path(os.environ.get("SWARMLM_HOME") or Path.home() / ".swarmlm")


@dataclass(frozen=True)
class ModelSource:
    model_id: str                # what servers announce under and clients look up
    directory: Path              # a checkpoint directory holding at least the parts this process loads

    def config(self) -> ModelConfig:
        from swarmlm.model.hf import load_config
        return load_config(self.directory)

    def load(self, *, dtype: torch.dtype = torch.float32, layers: range | None = None, with_embed: bool = True,
             with_head: bool = True) -> tuple[Transformer, ModelConfig]:
        from swarmlm.model.hf import load_model
        return load_model(self.directory, dtype=dtype, layers=layers, with_embed=with_embed, with_head=with_head)


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


async def open_model_source(model: str, *, peer: Any = None, data_dir: str | os.PathLike | None = None,
                            blocks: range | None = None, with_embed_head: bool = True) -> ModelSource:
    """Resolve MODEL (a directory or a manifest CID). For a CID, fetch the config, tokenizer and
    only `blocks` (and the embeddings and head when `with_embed_head`), verified, into a
    directory of their own, so a client and a server on one data dir never overwrite each other."""
    path = Path(model).expanduser()
    if path.is_dir():
        return ModelSource(directory_model_id(path), path)
    if looks_like_cid(model):
        if peer is None:
            raise UserError(f"{model} looks like a CID; fetching it needs the swarm (--initial-peers)")
        try:
            from swarmlm.store.manifest import fetch_model
        except ImportError:
            raise UserError("this build has no model manifests (store/manifest.py); pass a directory") from None
        blocks = range(0, 0) if blocks is None else blocks
        part = f"blocks-{blocks.start}-{blocks.stop}" + ("-ends" if with_embed_head else "")
        out = home_dir(data_dir) / "models" / model / part
        directory = await fetch_model(peer, model, out, blocks=blocks, with_embed_head=with_embed_head,
                                      data_dir=data_dir)
        return ModelSource(model, Path(directory))
    raise UserError(f"MODEL must be a checkpoint directory or a manifest CID; {model!r} is neither")
