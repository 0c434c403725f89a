"""Who holds what: provider records in the DHT, and the pure decisions built on them.

A peer that holds the whole DAG under a root announces one signed `ProviderRecord` under
`keys.providers_key(root)`, subkey = its peer ID, with a short TTL that it refreshes while it
runs; a holder that stops simply lets its record expire. The record carries the replication
target the holder keeps the root at, so any holder can tell when copies are missing.

`rank_providers` and `plan_replication` decide (who to ask first, whom to ask to pin)
without I/O, from rendezvous hashing: every peer computes the same order for a root, so
holders agree on one leader for re-replication and on the same next candidates. Knows
nothing of blocks or streams.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

from swarmlm.p2p import keys
from swarmlm.p2p.records import SignedRecord, record_type

MAX_REPLICAS = 64          # a pin asks for at most this many copies
MAX_MADDRS = 8
ROOTS_SERVICE = "store.roots"   # the directory (p2p/directory.py) where holders list their pinned roots (size: bytes)


@record_type("provider")
@dataclass(frozen=True)
class ProviderRecord:
    """"I hold every block under `root`." Published by the holder, under its own subkey."""
    root: str                 # CID of the DAG root (a file, or a manifest)
    size_bytes: int           # bytes of the file under root (0 if unknown)
    replicas: int             # copies the holder wants kept of root; 0: a cached copy, no target
    maddrs: list[str]         # where the holder listens, /p2p/ included

    def check(self) -> None:
        if not self.root or len(self.root) > 200:
            raise ValueError("root must be a CID string")
        if self.size_bytes < 0:
            raise ValueError(f"size_bytes {self.size_bytes} is negative")
        if not 0 <= self.replicas <= MAX_REPLICAS:
            raise ValueError(f"replicas {self.replicas} is outside 0..{MAX_REPLICAS}")
        if len(self.maddrs) > MAX_MADDRS:
            raise ValueError(f"more than {MAX_MADDRS} maddrs")


@dataclass(frozen=True)
class Provider:
    """A holder of a root, as read from the DHT (signature checked)."""
    peer_id: str
    record: ProviderRecord
    expires_at: float


def providers_from(records: Sequence[SignedRecord], root: str) -> list[Provider]:
    """The valid provider entries for `root`: the right type, for this root, signed by the subkey's owner."""
    out = []
    for r in records:
        if (isinstance(r.value, ProviderRecord) and r.value.root == root and r.subkey == r.signer):
            out.append(Provider(r.signer, r.value, r.expires_at))
    return out


async def find_providers(peer, root: str) -> list[Provider]:
    """Ask the DHT who holds `root`, newest entries."""
    return providers_from(await peer.get(keys.providers_key(root), latest=True), root)


async def announce(peer, root: str, *, size_bytes: int, replicas: int, ttl_s: float) -> bool:
    """Publish (or refresh) this peer's provider record for `root`."""
    record = ProviderRecord(root=root, size_bytes=size_bytes, replicas=replicas, maddrs=peer.maddrs[:MAX_MADDRS])
    return await peer.store(keys.providers_key(root), record, ttl_s=ttl_s, subkey=peer.peer_id)


# ---- decisions (pure) ------------------------------------------------------------------------

def rendezvous_rank(root: str, peer_ids: Sequence[str]) -> list[str]:
    """`peer_ids` in the order every peer computes for `root` (highest random weight first)."""
    def weight(pid: str) -> bytes:
        return hashlib.sha256(f"{root}\n{pid}".encode()).digest()
    return sorted(set(peer_ids), key=weight, reverse=True)


def rank_providers(root: str, providers: Sequence[str], *, banned: Sequence[str] = (), me: str = "") -> list[str]:
    """Providers to ask, banned ones and this peer left out, in rendezvous order (spreads load)."""
    skip = set(banned) | {me}
    return [p for p in rendezvous_rank(root, providers) if p not in skip]


def replication_target(providers: Sequence[Provider]) -> int:
    """The copies wanted of a root: the largest target any live holder announces."""
    return max((p.record.replicas for p in providers), default=0)


def plan_replication(root: str, *, me: str, holders: Sequence[str], candidates: Sequence[str],
                     target: int) -> list[str]:
    """Whom `me` should ask to pin `root` now, so that `target` peers hold it.

    Only the leader acts: the first of the live `holders` in rendezvous order (so a swarm of
    holders sends one round of requests, not one per holder). It asks the first non-holders
    in rendezvous order, as many as are missing. Everyone else gets [].
    """
    live = rendezvous_rank(root, holders)
    if not live or live[0] != me or len(live) >= target:
        return []
    missing = target - len(live)
    return [p for p in rendezvous_rank(root, candidates) if p not in set(live)][:missing]
