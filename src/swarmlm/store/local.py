"""The store's local commands, as cli.py calls them: `store add`, `store ls`, `store publish-model`, `store cat`.

Each `*_from_args` turns parsed arguments into one library call, prints its result (the CID
last, so scripts can take the last line) and returns an exit code. `add` records the root it
printed in roots.py's list, so `ls` can show the added files apart from their inner blocks. None of them touches the
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
from swarmlm.store.cid import DAG_JSON, Cid, CidError
from swarmlm.store.dag import add_file, file_size, iter_file, open_store
from swarmlm.store.roots import Root, load_roots, record_root


def add_from_args(args) -> int:
    """`swarmlm store add FILE`: add and pin a file, print its root CID."""
    store = open_store(args.data_dir)
    cid = add_file(store, args.file, cid_version=args.cid_version)
    store.pin(cid)
    record_root(store.root, Root(str(cid), Path(args.file).name, Path(args.file).stat().st_size))
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
    """`swarmlm store ls`: the files (CID as `add` printed it, bytes, pinned, name), then the other
    blocks (CID, bytes, pinned); with --pins only the pinned roots. Section headers start with '#'.

    The files are those `add` recorded, then any other pinned root (fetched by `store pin`, or a
    model manifest), whose name the store does not know."""
    store = open_store(args.data_dir)
    if args.pins:
        for root in store.pinned():
            print(f"{root}\t{_size_of(store, root)}\tpinned")
        return 0
    files = [(f.cid, f.size_bytes, _state(store, f.cid), f.name) for f in load_roots(store.root)]
    recorded = {_v1(cid) for cid, *_ in files}
    files += [(str(root), _size_of(store, root), _state(store, str(root)), _unknown_name(root))
              for root in store.pinned() if root.to_v1() not in recorded]
    print("# files (CID as `store add` printed it, bytes, pinned, name)")
    for row in files:
        print("\t".join(map(str, row)))
    roots = {_v1(cid) for cid, *_ in files}
    protected = store.protected()
    blocks = sorted((e for e in store.entries() if e.cid not in roots), key=lambda e: str(e.cid))
    print("# other blocks: the files' inner blocks and anything fetched (CID, bytes, pinned)")
    for e in blocks:
        print(f"{e.cid}\t{e.size_bytes}\t{'pinned' if e.cid in protected else '-'}")
    total = sum(e.size_bytes for e in store.entries())
    print(f"{len(files)} files and {len(blocks)} other blocks, {total} bytes in {store.root}", file=sys.stderr)
    return 0


def _unknown_name(root: Cid) -> str:
    return "(a model manifest)" if root.codec == DAG_JSON else "(pinned, not added here: name unknown)"


def _v1(text: str) -> Cid | None:
    try:
        return Cid.parse(text).to_v1()
    except CidError:
        return None


def _state(store, text: str) -> str:
    """pinned, - (present but not pinned) or missing (its root block is gone)."""
    cid = _v1(text)
    if cid is None or not store.has(cid):
        return "missing"
    return "pinned" if store.is_pinned(cid) else "-"


def _size_of(store, root: Cid) -> int | str:
    """The file's size; "missing" without its root block; "-" for a manifest (not a file)."""
    if not store.has(root):
        return "missing"
    return "-" if root.codec == DAG_JSON else file_size(store, root)


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
