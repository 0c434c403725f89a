"""The store's network commands, as cli.py calls them: `swarmlm node`, `store get`, `store pin`.

Each `*_from_args` turns parsed arguments into one library call and an exit code. The
clients (`get`, `pin`) join the swarm as DHT clients with a throwaway identity, so they can
run beside a node on the same data directory without taking its peer ID.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from swarmlm.errors import IntegrityError, NotFoundError, UserError
from swarmlm.log import get_logger
from swarmlm.store import dag, paths
from swarmlm.store.fetch import FetchOptions, get_file
from swarmlm.store.node import NodeOptions, pin_replicas, run_node

logger = get_logger(__name__)

PROGRESS_MIN_BYTES = 8 * 1024 * 1024     # show a progress bar for files at least this large


def data_dir_of(arg: str | None) -> str:
    """--data-dir, else $SWARMLM_HOME, else ~/.swarmlm."""
    return str(paths.data_dir(arg))


def node_from_args(args) -> int:
    options = NodeOptions(announce_interval_s=args.announce_interval, replication_interval_s=args.replication_interval,
                          max_store_bytes=args.max_store_bytes)
    asyncio.run(run_node(initial_peers=args.initial_peers, host=args.host, port=args.port,
                         data_dir=data_dir_of(args.data_dir), options=options))
    return 0


def get_from_args(args) -> int:
    store = dag.open_store(data_dir_of(args.data_dir))
    dag.parse_cid(args.cid)
    if args.output is not None and not Path(args.output).expanduser().resolve().parent.is_dir():
        raise UserError(f"the folder of {args.output} does not exist")

    async def fetch() -> None:
        from swarmlm.p2p.peer import Peer
        from swarmlm.store.providers import find_providers
        async with await Peer.create(initial_peers=args.initial_peers, client_mode=True) as peer:
            found = await find_providers(peer, args.cid)
            size = max((p.record.size_bytes for p in found), default=0)
            progress = not args.no_progress and size >= PROGRESS_MIN_BYTES
            try:
                stats = await get_file(peer, args.cid, store, args.output, options=FetchOptions(timeout_s=args.timeout),
                                       progress=progress, total_bytes=size)
            except NotFoundError as e:
                why = str(e) if found else "nobody in the swarm provides it"
                raise NotFoundError(f"cannot get {args.cid}: {why}") from None
            except IntegrityError as e:
                raise IntegrityError(f"cannot get {args.cid}: {e}") from None
            logger.info("fetched %d blocks (%d bytes, %d blocks over side channels) from %s in %.1f s; "
                        "%d were already local", stats.fetched_blocks, stats.fetched_bytes, stats.side_channel_blocks,
                        sorted(stats.blocks_by_peer), stats.seconds, stats.already_local)

    asyncio.run(fetch())
    return 0


def pin_from_args(args) -> int:
    dag.parse_cid(args.cid)

    async def pin() -> list[str]:
        from swarmlm.p2p.peer import Peer
        async with await Peer.create(initial_peers=args.initial_peers, client_mode=True) as peer:
            return await pin_replicas(peer, args.cid, args.replicas, timeout_s=args.timeout)

    holders = asyncio.run(pin())
    for peer_id in holders:
        print(peer_id)
    return 0
