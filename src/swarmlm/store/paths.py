"""Where a peer keeps its things: one data directory, `--data-dir`, else $SWARMLM_HOME, else ~/.swarmlm.

    <data_dir>/blocks/      the block store (store/blockstore.py), its pins.json included, and
                            roots.json, the files `store add` added (store/roots.py)
    <data_dir>/...          other layers add their own entries (identity key, fetched models)

Every command resolves the directory through `data_dir`, so they all agree.
"""

from __future__ import annotations

import os
from pathlib import Path

BLOCKS = "blocks"


def data_dir(arg: str | os.PathLike | None = None) -> Path:
    """`arg` if given, else $SWARMLM_HOME, else ~/.swarmlm (not created here)."""
    chosen = arg or os.environ.get("SWARMLM_HOME") or Path.home() / ".swarmlm"
    return Path(chosen).expanduser()


def blocks_dir(arg: str | os.PathLike | None = None) -> Path:
    """The block store's directory inside the data directory."""
    return data_dir(arg) / BLOCKS
