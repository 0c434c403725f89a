"""Telling the swarm which blocks this server holds, and keeping that news fresh.

`Announcer` stores one `dht.ServerRecord` per held block under `keys.block_key(model, i)`
(subkey: this peer's ID), signed by the peer. It re-announces every `ttl_s / 3` so a record
never lapses while the server lives, and at once when poked (state change, a session opened
or closed), and lists the model in the swarm's directory (p2p/directory.py); `announce_offline` marks the span offline on a clean shutdown or a move. The
record's contents come from a callable the host passes in, so this module knows nothing of
sessions, tensors or models.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from swarmlm.errors import PeerError
from swarmlm.log import get_logger
from swarmlm.p2p.directory import publish_entry
from swarmlm.swarm.dht import MODELS_SERVICE, ServerRecord, store_record

logger = get_logger(__name__)


class Announcer:
    def __init__(self, peer: Any, make_record: Callable[[], ServerRecord], *, ttl_s: float = 30.0, n_layers: int = 0):
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        self.peer = peer
        self.make_record = make_record   # the record as of now (state, span, load)
        self.ttl_s = ttl_s
        self.n_layers = n_layers         # the model's blocks: > 0 also lists the model in the swarm's directory
        self._poked = asyncio.Event()

    async def announce(self) -> int:
        """Announce the current record once; returns how many block stores were accepted."""
        record = self.make_record()
        if self.n_layers > 0:
            await publish_entry(self.peer, MODELS_SERVICE, record.model, ttl_s=self.ttl_s, size=self.n_layers)
        return await store_record(self.peer, record, ttl_s=self.ttl_s)

    def poke(self) -> None:
        """Re-announce soon (the record changed)."""
        self._poked.set()

    async def run_forever(self, *, min_interval_s: float = 0.5) -> None:
        """Re-announce every ttl/3, or when poked (at most every `min_interval_s`). Cancel to stop."""
        while True:
            try:
                await asyncio.wait_for(self._poked.wait(), self.ttl_s / 3)
            except asyncio.TimeoutError:
                pass
            self._poked.clear()
            try:
                await self.announce()
            except (PeerError, OSError) as e:
                logger.warning("re-announcing failed: %s", e)
            await asyncio.sleep(min_interval_s)

    async def announce_offline(self, start: int, end: int) -> None:
        """Mark [start, end) offline (the record stays until it expires, so clients learn at once).

        It keeps the full ttl: the DHT keeps whichever entry expires last, so a shorter one would be refused."""
        record = self.make_record()
        offline = ServerRecord(model=record.model, start=start, end=end, state="offline", dtype=record.dtype,
                               block_tokens_per_s=record.block_tokens_per_s, free_cache_tokens=0, sessions=0,
                               quantization=record.quantization)
        try:
            await store_record(self.peer, offline, ttl_s=self.ttl_s)
        except (PeerError, OSError) as e:
            logger.warning("announcing offline failed: %s", e)
