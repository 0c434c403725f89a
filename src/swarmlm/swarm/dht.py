"""What block servers announce in the DHT, and reading it back; shared by servers and clients.

A server stores one signed `ServerRecord` under `keys.block_key(model_id, i)` for every
block i it holds, with its own peer ID as the subkey, so each block's key lists every server
of that block and nobody can overwrite another's entry. `read_servers` gathers the newest
record per server over all blocks of a model. Knows nothing of tensors or sessions.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Any

from swarmlm.log import get_logger
from swarmlm.p2p.keys import block_key, peer_subkey, subkey_owner
from swarmlm.p2p.records import record_type

logger = get_logger(__name__)

STATES = ("joining", "online", "offline")
MODELS_SERVICE = "swarm.models"   # the directory (p2p/directory.py) where servers list their model (size: its blocks)


@record_type("swarm.server")
@dataclass(frozen=True)
class ServerRecord:
    model: str                   # model id: a manifest CID, or the content hash of a checkpoint directory
    start: int                   # span [start, end) held
    end: int
    state: str                   # one of STATES
    dtype: str                   # compute dtype; clients send hidden states in it
    block_tokens_per_s: float    # measured decode throughput of one block
    free_cache_tokens: int       # cache positions still available for new sessions
    sessions: int                # inference sessions open now
    quantization: str = "none"   # weight quantization of the span (model/quant.py: "none", "int8", "int4-g32"...);
                                 # a client chains only servers of the quantization it asked for
    version: str = ""            # the server's swarmlm version (shown by the dashboard)
    tokens_served: int = 0       # token positions its inference steps have run since it started (a counter:
                                 # the dashboard's served tokens/s is its rise between two looks)

    def check(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(f"bad span {self.start}:{self.end}")
        if self.state not in STATES:
            raise ValueError(f"unknown state {self.state!r}")
        if not 0 < len(self.quantization) <= 16:
            raise ValueError("quantization must be a short name")
        if len(self.version) > 32 or self.tokens_served < 0:
            raise ValueError("version must be short, tokens served not negative")
        if not (math.isfinite(self.block_tokens_per_s) and self.block_tokens_per_s >= 0
                and self.free_cache_tokens >= 0 and self.sessions >= 0):
            raise ValueError("throughput, free cache and sessions must be finite and not negative")


async def store_record(peer: Any, record: ServerRecord, *, ttl_s: float) -> int:
    """Store `record` under the key of every block in its span; returns how many stores were accepted."""
    subkey = peer_subkey(peer.peer_id)
    blocks = range(record.start, record.end)
    results = await asyncio.gather(*(peer.store(block_key(record.model, i), record, ttl_s=ttl_s, subkey=subkey)
                                     for i in blocks), return_exceptions=True)
    ok = 0
    for i, r in zip(blocks, results):
        if isinstance(r, BaseException):
            logger.warning("announcing block %d failed: %s", i, r)
        elif r:
            ok += 1
    return ok


async def read_servers(peer: Any, model_id: str, n_layers: int) -> dict[str, ServerRecord]:
    """peer ID -> its newest record for `model_id`, in any state, read from every block's key."""
    return {peer_id: rec.value for peer_id, rec in (await read_server_records(peer, model_id, n_layers)).items()}


async def read_server_records(peer: Any, model_id: str, n_layers: int) -> dict[str, Any]:
    """peer ID -> its newest `SignedRecord` (a `ServerRecord` and when it expires) for `model_id`."""
    results = await asyncio.gather(*(peer.get(block_key(model_id, i), latest=True) for i in range(n_layers)),
                                   return_exceptions=True)
    newest: dict[str, Any] = {}                 # peer -> its newest SignedRecord
    for found in results:
        if isinstance(found, BaseException):
            logger.info("reading servers from the DHT: %s", found)
            continue
        for rec in found:
            value = rec.value
            if not isinstance(value, ServerRecord) or value.model != model_id or value.end > n_layers:
                continue
            if rec.subkey is None or subkey_owner(rec.subkey) != rec.signer:
                continue
            old = newest.get(rec.signer)
            if old is None or rec.expires_at > old.expires_at:
                newest[rec.signer] = rec
    return dict(sorted(newest.items()))
