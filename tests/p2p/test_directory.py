"""The swarm's directory: entries round-trip per service, and a misfiled or malformed entry is not listed."""

import asyncio
import time

import pytest

from swarmlm.errors import WireError
from swarmlm.p2p import keys
from swarmlm.p2p.directory import DirectoryEntry, entries_from, list_entries, publish_entry
from swarmlm.p2p.identity import Identity
from swarmlm.p2p.memory import MemoryNetwork, MemoryPeer
from swarmlm.p2p.records import SignedRecord, open_record, seal


def test_entries_are_listed_per_service_and_name():
    async def go():
        net = MemoryNetwork()
        a, b = await MemoryPeer.create(net), await MemoryPeer.create(net)
        assert await publish_entry(a, "swarm.models", "m1", ttl_s=30, size=4)
        assert await publish_entry(b, "swarm.models", "m1", ttl_s=30, size=4)
        assert await publish_entry(b, "swarm.models", "m2", ttl_s=30, size=8)
        assert await publish_entry(a, "collab.runs", "r", ttl_s=30)
        return await list_entries(a, "swarm.models"), await list_entries(b, "collab.runs"), a.peer_id, b.peer_id

    models, runs, a, b = asyncio.run(go())
    assert models == {"m1": {a: DirectoryEntry("swarm.models", "m1", 4), b: DirectoryEntry("swarm.models", "m1", 4)},
                      "m2": {b: DirectoryEntry("swarm.models", "m2", 8)}}
    assert runs == {"r": {a: DirectoryEntry("collab.runs", "r", 0)}}


def test_an_entry_filed_under_another_name_or_service_is_not_listed():
    me = Identity.generate()
    key = keys.directory_key("swarm.models")

    def signed(entry: DirectoryEntry, subkey: str) -> SignedRecord:
        return open_record(seal(me, key, entry, expires_at=time.time() + 60, subkey=subkey), key=key, subkey=subkey)

    good = signed(DirectoryEntry("swarm.models", "m", 4), f"{me.peer_id}/m")
    misnamed = signed(DirectoryEntry("swarm.models", "other", 4), f"{me.peer_id}/m")   # claims m's place
    other_service = signed(DirectoryEntry("collab.runs", "m", 0), f"{me.peer_id}/m")
    assert entries_from([misnamed, other_service, good], "swarm.models") == {"m": {me.peer_id: good.value}}


@pytest.mark.parametrize("entry", [DirectoryEntry("Bad Service", "m"), DirectoryEntry("swarm.models", ""),
                                   DirectoryEntry("swarm.models", "a/b"), DirectoryEntry("swarm.models", "x" * 201),
                                   DirectoryEntry("swarm.models", "m", -1)])
def test_a_malformed_entry_is_refused_when_read(entry):
    me = Identity.generate()
    key = keys.directory_key("swarm.models")
    # seal() does not apply the rules (a liar would not either): the reader must
    data = seal(me, key, entry, expires_at=time.time() + 60, subkey=f"{me.peer_id}/m")
    with pytest.raises(WireError):
        open_record(data, key=key, subkey=f"{me.peer_id}/m")
