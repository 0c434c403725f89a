"""MemoryPeer: the in-process twin keeps Peer's promises (limits, error replies, signed records)."""

import asyncio
import time
from contextlib import aclosing
from dataclasses import dataclass

import pytest

from swarmlm import serialize
from swarmlm.errors import PeerError, PeerTimeout, RemoteError
from swarmlm.p2p import keys
from swarmlm.p2p.identity import Identity
from swarmlm.p2p.memory import MemoryNetwork, MemoryPeer
from swarmlm.p2p.records import record_type, seal


@record_type("test-memory-note")
@dataclass(frozen=True)
class Note:
    text: str


async def _echo(peer_id, request):
    if request == b"boom":
        raise ValueError("boom requested")
    return request


async def _count(peer_id, request):
    for i in range(int(request)):
        yield bytes([i])


async def _pair():
    net = MemoryNetwork()
    a = await MemoryPeer.create(net)
    b = await MemoryPeer.create(net)
    await a.add_handler("echo", _echo, max_request_bytes=16)
    await a.add_stream_handler("count", _count, max_request_bytes=16)
    return net, a, b


def test_call_returns_reply_and_errors_are_remote_errors():
    async def go():
        net, a, b = await _pair()
        assert await b.call(a.peer_id, "echo", b"hi", timeout_s=1, max_response_bytes=16) == b"hi"
        with pytest.raises(RemoteError, match="boom requested"):
            await b.call(a.peer_id, "echo", b"boom", timeout_s=1, max_response_bytes=16)
        with pytest.raises(RemoteError, match="exceeds"):
            await b.call(a.peer_id, "echo", b"x" * 17, timeout_s=1, max_response_bytes=64)
        assert await b.call(a.peer_id, "echo", b"still", timeout_s=1, max_response_bytes=16) == b"still"
    asyncio.run(go())


def test_stream_yields_chunks_and_stops_early():
    async def go():
        net, a, b = await _pair()
        assert [c async for c in b.call_stream(a.peer_id, "count", b"3", timeout_s=1, max_chunk_bytes=4)] \
            == [b"\0", b"\1", b"\2"]
        async with aclosing(b.call_stream(a.peer_id, "count", b"100", timeout_s=1, max_chunk_bytes=4)) as s:
            async for _ in s:
                break
    asyncio.run(go())


def test_killed_peer_is_unreachable():
    async def go():
        net, a, b = await _pair()
        net.kill(a.peer_id)
        with pytest.raises(PeerError):
            await b.call(a.peer_id, "echo", b"hi", timeout_s=1, max_response_bytes=16)
    asyncio.run(go())


def test_slow_handler_times_out():
    async def go():
        net, a, b = await _pair()

        async def slow(peer_id, request):
            await asyncio.sleep(10)
            return b""
        await a.add_handler("slow", slow, max_request_bytes=16)
        with pytest.raises(PeerTimeout):
            await b.call(a.peer_id, "slow", b"", timeout_s=0.05, max_response_bytes=16)
    asyncio.run(go())


def test_records_from_each_peer_come_back_and_forgeries_are_dropped():
    async def go():
        net, a, b = await _pair()
        key = keys.providers_key("bafytest")
        await a.store(key, Note("from a"), ttl_s=30, subkey=a.peer_id)
        await b.store(key, Note("from b"), ttl_s=30, subkey=b.peer_id)
        mallory = Identity.generate()
        forged = serialize.unpack(seal(mallory, key, Note("forged"), expires_at=time.time() + 30,
                                       subkey=mallory.peer_id))
        forged["subkey"] = forged["signer"] = a.peer_id + "x"
        net.table[key]["intruder"] = (serialize.pack(forged), time.time() + 30)   # bypasses store checks
        got = await b.get(key)
        assert sorted(r.value.text for r in got) == ["from a", "from b"]
    asyncio.run(go())
