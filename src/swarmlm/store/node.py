"""A storage node: serves its block store, announces what it holds, pins on request, keeps copies.

`StoreNode(peer, store, options)` adds to a running `Peer`:
- the block exchange (exchange.BlockService) and a pin RPC:
      swarmlm/pin/1  unary  PinRequest -> PinReply   (fetch the DAG, pin it, announce it)
- an announce loop: a provider record for every pinned root, refreshed each
  `announce_interval_s` with a TTL of three intervals, so a vanished node drops out;
- a replication loop: for every pinned root with a target of R copies, count the live
  holders (provider records whose holder still answers `has`); if fewer than R, the
  rendezvous leader among them asks the next peers to pin it (providers.plan_replication);
- garbage collection of unpinned blocks whenever the store outgrows `max_store_bytes`.

`pin_replicas` is the client side of `swarmlm store pin`. `run_node` is `swarmlm node`.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from swarmlm import serialize
from swarmlm.errors import PeerError, SwarmError, UserError, WireError
from swarmlm.log import get_logger
from swarmlm.p2p import rpc
from swarmlm.p2p.directory import publish_entry
from swarmlm.store import dag, metrics
from swarmlm.store.exchange import HAS, MAX_REQUEST_BYTES, BlockService, HasReply, HasRequest
from swarmlm.store.fetch import FetchOptions, fetch_dag
from swarmlm.store.providers import (MAX_REPLICAS, ROOTS_SERVICE, announce, find_providers, plan_replication,
                                     rendezvous_rank, replication_target)

logger = get_logger(__name__)

PIN = "swarmlm/pin/1"
MAX_HINTS = 16
_TARGETS_FILE = "replicas.json"


@dataclass(frozen=True)
class PinRequest:
    root: str                 # CID of the DAG to fetch and pin
    replicas: int             # copies the swarm should keep, 1..MAX_REPLICAS
    providers: list[str]      # peer IDs known to hold it (hints; the DHT is asked too), at most MAX_HINTS


@dataclass(frozen=True)
class PinReply:
    size_bytes: int           # bytes of the pinned file


@dataclass(frozen=True)
class NodeOptions:
    announce_interval_s: float = 30.0      # provider records are refreshed this often (TTL: 3x)
    replication_interval_s: float = 30.0   # how often copies of pinned roots are counted
    max_store_bytes: int | None = None     # unpinned blocks are collected above this size
    pin_timeout_s: float = 600.0           # a pin request may take this long (it fetches the DAG)
    has_timeout_s: float = 5.0             # a holder that does not answer `has` in time counts as gone


class StoreNode:
    """Serves `store` through `peer`; `await node.start()`, then `await node.close()`."""

    def __init__(self, peer: Any, store: Any, options: NodeOptions = NodeOptions(), *,
                 fetch_options: FetchOptions = FetchOptions()):
        self.peer = peer
        self.store = store
        self.options = options
        self.fetch_options = fetch_options
        self.service = BlockService(peer, store)
        self._pinning: dict[str, asyncio.Task] = {}
        self._tasks: list[asyncio.Task] = []
        root = getattr(store, "root", None)           # a MemoryBlockStore keeps its targets in memory
        self._targets_path = Path(root) / _TARGETS_FILE if root is not None else None
        self._targets: dict[str, int] = {}
        self._wake_announce = asyncio.Event()
        self.pin_failures = 0                         # pin requests that failed (metrics.py reports it)

    async def start(self) -> None:
        await self.service.start()
        metrics.watch(self)
        await self.peer.add_handler(PIN, self.rpc_pin, max_request_bytes=MAX_REQUEST_BYTES)
        self._tasks = [asyncio.create_task(self._announce_forever(), name="announce"),
                       asyncio.create_task(self._replicate_forever(), name="replicate")]

    async def close(self) -> None:
        for task in [*self._tasks, *self._pinning.values()]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._pinning.values(), return_exceptions=True)
        self._tasks, self._pinning = [], {}
        await self.service.close()

    # ---- pin -------------------------------------------------------------------------------------

    async def rpc_pin(self, peer_id: str, request: bytes) -> bytes:
        req = serialize.decode_message(request, PinRequest, max_bytes=MAX_REQUEST_BYTES)
        root = check_pin_request(req)
        try:
            size = await self.pin(str(root), req.replicas, hints=req.providers)
        except Exception:
            self.pin_failures += 1
            raise
        return serialize.encode_message(PinReply(size_bytes=size))

    async def pin(self, root: str, replicas: int, *, hints: Sequence[str] = ()) -> int:
        """Fetch (if needed) and pin `root`, keep at least `replicas` copies; returns the file size."""
        task = self._pinning.get(root)
        if task is None:
            task = asyncio.create_task(self._fetch_and_pin(root, list(hints)))
            self._pinning[root] = task
            task.add_done_callback(lambda _: self._pinning.pop(root, None))
        size = await asyncio.shield(task)
        targets = self._load_targets()
        if targets.get(root, 0) < replicas:
            targets[root] = replicas
            self._save_targets(targets)
        self._wake_announce.set()
        return size

    async def _fetch_and_pin(self, root: str, hints: list[str]) -> int:
        found = await find_providers(self.peer, root)
        providers = list(dict.fromkeys([*hints, *rendezvous_rank(root, [p.peer_id for p in found])]))
        providers = [p for p in providers if p != self.peer.peer_id]
        cid = dag.parse_cid(root)
        await fetch_dag(self.peer, cid, self.store, providers=providers, options=self.fetch_options)
        await asyncio.to_thread(dag.pin, self.store, cid)
        logger.info("pinned %s", root)
        await self._collect_garbage()
        return await asyncio.to_thread(dag.file_size, self.store, cid)

    # ---- announce --------------------------------------------------------------------------------

    async def announce_all(self) -> int:
        """Publish a provider record for every pinned root; returns how many were stored."""
        targets = self._load_targets()
        ttl = 3 * self.options.announce_interval_s
        n = 0
        for root in await asyncio.to_thread(dag.pinned_roots, self.store):
            size = await asyncio.to_thread(dag.file_size, self.store, root)
            key = str(root)
            if await announce(self.peer, key, size_bytes=size, replicas=targets.get(key, 1), ttl_s=ttl):
                n += 1
            await publish_entry(self.peer, ROOTS_SERVICE, key, ttl_s=ttl, size=size)   # listed for the dashboard
        return n

    async def _announce_forever(self) -> None:
        while True:
            self._wake_announce.clear()
            try:
                await self.announce_all()
                await self._collect_garbage()
            except (SwarmError, OSError) as e:
                logger.warning("announcing failed: %s", e)
            # asyncio.wait, not wait_for: on 3.11 wait_for can swallow a cancel that races the event
            waiter = asyncio.ensure_future(self._wake_announce.wait())
            try:
                await asyncio.wait([waiter], timeout=self.options.announce_interval_s)
            finally:
                waiter.cancel()

    # ---- replication ----------------------------------------------------------------------------

    async def check_replication(self) -> list[str]:
        """One round: for each pinned root short of copies, ask peers to pin it if we lead. Returns who was asked."""
        asked = []
        targets = self._load_targets()
        for root in await asyncio.to_thread(dag.pinned_roots, self.store):
            key = str(root)
            found = await find_providers(self.peer, key)
            target = max(targets.get(key, 1), replication_target(found))
            if target <= 1:
                continue
            others = [p.peer_id for p in found if p.peer_id != self.peer.peer_id]
            alive = await live_holders(self.peer, key, others, timeout_s=self.options.has_timeout_s)
            holders = [self.peer.peer_id, *alive]
            candidates = await self.peer.known_peers()
            for peer_id in plan_replication(key, me=self.peer.peer_id, holders=holders, candidates=candidates,
                                            target=target):
                try:
                    await call_pin(self.peer, peer_id, key, target, holders, timeout_s=self.options.pin_timeout_s)
                    logger.info("re-replicated %s to %s (%d of %d copies were live)", key, peer_id,
                                len(holders), target)
                    asked.append(peer_id)
                except PeerError as e:
                    _log_pin_failure(peer_id, key, e)
        return asked

    async def _replicate_forever(self) -> None:
        while True:
            await asyncio.sleep(self.options.replication_interval_s)
            try:
                await self.check_replication()
            except (SwarmError, OSError) as e:
                logger.warning("replication check failed: %s", e)

    # ---- housekeeping ----------------------------------------------------------------------------

    async def _collect_garbage(self) -> None:
        if self.options.max_store_bytes is not None:
            freed = await asyncio.to_thread(dag.collect_garbage, self.store, self.options.max_store_bytes)
            if freed:
                logger.info("collected %d bytes of unpinned blocks", freed)

    def _load_targets(self) -> dict[str, int]:
        if self._targets_path is None:
            return dict(self._targets)
        try:
            data = json.loads(self._targets_path.read_text())
            return {str(k): int(v) for k, v in data.items()}
        except (OSError, ValueError, AttributeError):
            return {}

    def _save_targets(self, targets: dict[str, int]) -> None:
        if self._targets_path is None:
            self._targets = dict(targets)
            return
        tmp = self._targets_path.with_name(self._targets_path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(targets, sort_keys=True))
        os.replace(tmp, self._targets_path)


def check_pin_request(req: PinRequest) -> dag.Cid:
    """`WireError` unless the request names a well-formed CID, a sane target and a few peer IDs."""
    if not 1 <= req.replicas <= MAX_REPLICAS:
        raise WireError(f"replicas must be in 1..{MAX_REPLICAS}, got {req.replicas}")
    if len(req.providers) > MAX_HINTS or not all(isinstance(p, str) and 0 < len(p) <= 128 for p in req.providers):
        raise WireError(f"providers must be at most {MAX_HINTS} peer IDs")
    if not isinstance(req.root, str) or len(req.root) > 128:
        raise WireError("malformed root CID")
    return dag.parse_cid(req.root)


# ---- client side -----------------------------------------------------------------------------

async def call_pin(peer: Any, peer_id: str, root: str, replicas: int, hints: Sequence[str], *,
                   timeout_s: float) -> PinReply:
    request = PinRequest(root=root, replicas=replicas, providers=list(hints)[:MAX_HINTS])
    return await rpc.call_message(peer, peer_id, PIN, request, PinReply, timeout_s=timeout_s)


async def live_holders(peer: Any, root: str, peer_ids: Sequence[str], *, timeout_s: float) -> list[str]:
    """Those of `peer_ids` that answer `has(root)` with yes within `timeout_s`."""
    async def holds(peer_id: str) -> bool:
        try:
            reply = await rpc.call_message(peer, peer_id, HAS, HasRequest(cids=[root]), HasReply, timeout_s=timeout_s)
            return reply.have == [True]
        except PeerError:
            return False
    answers = await asyncio.gather(*(holds(p) for p in peer_ids))
    return [p for p, ok in zip(peer_ids, answers) if ok]


async def pin_replicas(peer: Any, root: str, replicas: int, *, timeout_s: float = 600.0) -> list[str]:
    """Make sure at least `replicas` peers hold `root`: tell holders the target, ask others to pin.

    Returns the holders' peer IDs; raises `SwarmError` if fewer than `replicas` could be found.
    """
    dag.parse_cid(root)
    if not 1 <= replicas <= MAX_REPLICAS:
        raise UserError(f"--replicas must be in 1..{MAX_REPLICAS}")
    found = await find_providers(peer, root)
    holders = await live_holders(peer, root, [p.peer_id for p in found], timeout_s=10.0)
    if not holders:
        raise SwarmError(f"nobody in the swarm holds {root}; add it on a node first")
    done: list[str] = []
    for peer_id in holders:                       # existing holders learn the new target
        try:
            await call_pin(peer, peer_id, root, replicas, holders, timeout_s=timeout_s)
            done.append(peer_id)
        except PeerError as e:
            logger.warning("holder %s refused the pin: %s", peer_id, e)
    candidates = [p for p in rendezvous_rank(root, await peer.known_peers()) if p not in set(holders)]
    for peer_id in candidates:
        if len(done) >= replicas:
            break
        try:
            await call_pin(peer, peer_id, root, replicas, done or holders, timeout_s=timeout_s)
            done.append(peer_id)
        except PeerError as e:
            _log_pin_failure(peer_id, root, e)
    if len(done) < replicas:
        raise SwarmError(f"only {len(done)} of {replicas} peers hold {root} (peers known: {len(candidates) + len(holders)})")
    return done


def does_not_store(error: PeerError) -> bool:
    """True if the peer has no pin handler: a trainer or a server, not a storage node. libp2p says
    "protocols not supported", the in-memory twin "protocol not supported"."""
    return re.search(r"protocols? not supported", str(error)) is not None


def _log_pin_failure(peer_id: str, root: str, error: PeerError) -> None:
    if does_not_store(error):                 # an ordinary outcome: most peers of a swarm store nothing
        logger.info("%s does not store blocks; asking the next peer to pin %s", peer_id, root)
    else:
        logger.warning("%s could not pin %s: %s", peer_id, root, error)


# ---- `swarmlm node` --------------------------------------------------------------------------

def ready_line(store: Any) -> str:
    """The line `swarmlm node` prints after its multiaddrs: what it stores and that it serves it."""
    n_blocks = sum(1 for _ in store.entries())
    n_roots = len(store.pinned())
    return (f"ready: storing {n_blocks} block{'s' * (n_blocks != 1)} ({n_roots} pinned "
            f"root{'s' * (n_roots != 1)}) in {store.root}; serving them to the swarm")


async def run_node(*, initial_peers: Sequence[str], host: str, port: int, data_dir: str,
                   options: NodeOptions, out=sys.stdout) -> None:
    """Start a peer and a store node on `data_dir`, print the multiaddrs (one a line) and then a
    `ready: ...` line, run until SIGINT/SIGTERM."""
    from swarmlm.p2p.peer import Peer

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    store = dag.open_store(data_dir)
    peer = await Peer.create(initial_peers=initial_peers, host=host, port=port, data_dir=data_dir)
    node = StoreNode(peer, store, options)
    try:
        await node.start()
        for maddr in peer.maddrs:
            print(maddr, file=out)
        print(await asyncio.to_thread(ready_line, store), file=out)
        out.flush()
        await stop.wait()
        logger.info("stopping node %s", peer.peer_id)
    finally:
        await node.close()
        await peer.shutdown()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
