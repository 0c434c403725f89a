"""A directory of what runs in the swarm, per service: the one place a newcomer (the dashboard) can
list models, training runs and stored roots without being told their names.

Every record key in the DHT names its object (`blocks/<model>/<i>`, `collab/<run>/progress`), so
nothing could be listed without a name. A peer that runs something also publishes one signed
`DirectoryEntry` under `keys.directory_key(service)`, subkey `peer_id/name`, with the same TTL as
its other records; an entry lapses with its publisher.

    await publish_entry(peer, "swarm.models", model_id, ttl_s=30, size=n_layers)
    await list_entries(peer, "swarm.models") -> {name: {peer_id: DirectoryEntry}}

A service added later picks its own service name and publishes its entries the same way.
Knows nothing of what the names mean.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from swarmlm.p2p import keys
from swarmlm.p2p.records import record_type

MAX_NAME_CHARS = 200
SERVICE = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")


@record_type("p2p.directory")
@dataclass(frozen=True)
class DirectoryEntry:
    service: str      # e.g. "swarm.models"; must equal the service of the key it is found under
    name: str         # the object's ID within the service: a model ID, a run ID, a root CID
    size: int = 0     # one service-defined count (a model's blocks, a root's bytes); 0 if none

    def check(self) -> None:
        if not SERVICE.match(self.service):
            raise ValueError(f"bad service name {self.service!r}")
        if not self.name or len(self.name) > MAX_NAME_CHARS or "/" in self.name:
            raise ValueError("name must be 1..200 characters without '/'")
        if self.size < 0:
            raise ValueError("size must not be negative")


async def publish_entry(peer: Any, service: str, name: str, *, ttl_s: float, size: int = 0) -> bool:
    """Publish (or refresh) this peer's entry for `name` under `service`."""
    entry = DirectoryEntry(service, name, size)
    entry.check()
    return await peer.store(keys.directory_key(service), entry, ttl_s=ttl_s,
                            subkey=keys.peer_subkey(peer.peer_id, name))


def entries_from(records: Any, service: str) -> dict[str, dict[str, DirectoryEntry]]:
    """name -> {peer ID -> entry}, keeping entries of this service whose subkey names them and their signer."""
    out: dict[str, dict[str, DirectoryEntry]] = {}
    for rec in records:
        value = rec.value
        if not isinstance(value, DirectoryEntry) or value.service != service:
            continue
        if rec.subkey != keys.peer_subkey(rec.signer, value.name):
            continue
        out.setdefault(value.name, {})[rec.signer] = value
    return out


async def list_entries(peer: Any, service: str) -> dict[str, dict[str, DirectoryEntry]]:
    """What the DHT lists under `service` now (see `entries_from`)."""
    return entries_from(await peer.get(keys.directory_key(service), latest=True), service)
