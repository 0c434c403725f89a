"""The store's local commands, as cli.py calls them: `store add`, `store ls`, `store publish-model`, `store cat`.

Each `*_from_args` turns parsed arguments into one library call, prints its result (the CID
last, so scripts can take the last line) and returns an exit code. None of them touches the
network; `store get`, `store pin` and `node` are in commands.py.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

from swarmlm.errors import NotFoundError, UserError
from swarmlm.store.blockstore import MissingBlock
from swarmlm.store.cid import Cid
from swarmlm.store.dag import add_file, iter_file, open_store


def add_from_args(args) -> int:
    """`swarmlm store add FILE`: add and pin a file, print its root CID."""
    store = open_store(args.data_dir)
    cid = add_file(store, args.file, cid_version=args.cid_version)
    store.pin(cid)
    print(cid)
    return 0


def publish_from_args(args) -> int:
    """`swarmlm store publish-model DIR`: add a checkpoint per block under a manifest, print its CID."""
    from swarmlm.store.manifest import publish_model
    store = open_store(args.data_dir)
    if not Path(args.model_dir).is_dir():
        raise UserError(f"no model directory at {args.model_dir}")
    print(publish_model(store, args.model_dir, name=args.name))
    return 0


def ls_from_args(args) -> int:
    """`swarmlm store ls`: every block (CID, bytes, pinned or not), or with --pins the pinned roots."""
    store = open_store(args.data_dir)
    if args.pins:
        from swarmlm.store.dag import file_size
        for root in store.pinned():
            size = file_size(store, root) if store.has(root) else "missing"
            print(f"{root}\t{size}\tpinned")
        return 0
    protected = store.protected()
    entries = sorted(store.entries(), key=lambda e: str(e.cid))
    for e in entries:
        print(f"{e.cid}\t{e.size_bytes}\t{'pinned' if e.cid in protected else '-'}")
    print(f"{len(entries)} blocks, {sum(e.size_bytes for e in entries)} bytes in {store.root}", file=sys.stderr)
    return 0


def cat_from_args(args) -> int:
    """`swarmlm store cat CID [-o OUT]`: write a file from the local store, every block verified."""
    store = open_store(args.data_dir)
    root = Cid.parse(args.cid)
    if not store.has(root):
        raise NotFoundError(f"{args.cid} is not in the local store {store.root} "
                            f"(`swarmlm store get` fetches it from the swarm)")
    try:
        _write(store, root, args.output)
    except MissingBlock as e:
        raise NotFoundError(f"{args.cid} is incomplete in the local store: {e}") from None
    return 0


def _write(store, root: Cid, output: str | None) -> None:
    if output is None:
        for piece in iter_file(store, root):
            sys.stdout.buffer.write(piece)
        sys.stdout.buffer.flush()
        return
    out = Path(output)
    if not out.parent.is_dir():
        raise UserError(f"the folder of {output} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for piece in iter_file(store, root):
                f.write(piece)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
