"""MODEL for private inference: a checkpoint directory or a manifest CID, and the id parties and
clients agree on (store/model_id.py: the directory's `dir-` hash, as the swarm computes it, or
the CID). Knows nothing of sessions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from swarmlm.errors import UserError
from swarmlm.model.transformer import Transformer
from swarmlm.store import paths
from swarmlm.store.model_id import directory_model_id, looks_like_cid


async def resolve(model: str, *, peer: Any = None, data_dir: str | os.PathLike | None = None,
                  with_weights: bool = True) -> tuple[str, Path]:
    """(model id, a local directory holding it): a CID is fetched from the swarm's store, verified
    (the whole model for a party; config and tokenizer only for a client)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return directory_model_id(path), path
    if not looks_like_cid(model):
        raise UserError(f"MODEL must be a checkpoint directory or a manifest CID; {model!r} is neither")
    if peer is None:
        raise UserError(f"{model} looks like a CID; fetching it needs the swarm (--initial-peers)")
    from swarmlm.store.manifest import fetch_model
    home = paths.data_dir(data_dir)
    part = "mpc-full" if with_weights else "mpc-client"
    out = home / "models" / model / part
    directory = await fetch_model(peer, model, out, blocks=None if with_weights else range(0, 0),
                                  with_embed_head=with_weights, data_dir=data_dir)
    return model, Path(directory)


async def open_model(model: str, *, peer: Any = None, data_dir: str | os.PathLike | None = None
                     ) -> tuple[str, Transformer]:
    from swarmlm.model.hf import load_model
    model_id, directory = await resolve(model, peer=peer, data_dir=data_dir)
    net, _ = load_model(directory)
    return model_id, net.eval()
