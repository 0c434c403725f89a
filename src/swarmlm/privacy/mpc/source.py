"""MODEL for private inference: a checkpoint directory or a manifest CID, and the id parties and
clients agree on (`dir-` + SHA-256 of config.json and the safetensors files, as the swarm
computes it, or the CID). Knows nothing of sessions.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from swarmlm.errors import CheckpointError, UserError
from swarmlm.model.transformer import Transformer


def directory_id(directory: Path) -> str:
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory} has no config.json")
    files = [directory / "config.json", *sorted(p for p in directory.iterdir()
                                                if p.suffix == ".safetensors" or p.name.endswith(".index.json"))]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
        h.update(b"\0")
    return "dir-" + h.hexdigest()[:40]


async def resolve(model: str, *, peer: Any = None, data_dir: str | os.PathLike | None = None,
                  with_weights: bool = True) -> tuple[str, Path]:
    """(model id, a local directory holding it): a CID is fetched from the swarm's store, verified
    (the whole model for a party; config and tokenizer only for a client)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return directory_id(path.resolve()), path
    from swarmlm.store.cid import Cid
    try:
        Cid.parse(model)
    except Exception:
        raise UserError(f"MODEL must be a checkpoint directory or a manifest CID; {model!r} is neither") from None
    if peer is None:
        raise UserError(f"{model} looks like a CID; fetching it needs the swarm (--initial-peers)")
    from swarmlm.store.manifest import fetch_model
    home = Path(data_dir).expanduser() if data_dir else Path(os.environ.get("SWARMLM_HOME") or Path.home() / ".swarmlm")
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
