"""Where a served or used model comes from, and the id servers and clients agree on
(store/model_id.py: a directory's `dir-` hash, or a manifest CID).

MODEL on the command line is either a checkpoint directory or a model manifest CID; of a CID
only the parts a process needs (its blocks, or the embeddings and head for a client) are
fetched from the swarm's store, each block checked against its CID (store/manifest.py), into
`<data_dir>/models/<cid>/<part>`.

Knows nothing of sessions or routing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from swarmlm.errors import UserError
from swarmlm.model.config import ModelConfig
from swarmlm.model.transformer import Transformer
from swarmlm.store.model_id import directory_model_id, looks_like_cid
from swarmlm.store.paths import data_dir as home_dir


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
