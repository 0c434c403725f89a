"""Direct TCP connections: only the holder of a fresh ticket made for its peer ID gets through;
anything else is refused with an error frame and the listener keeps serving."""

import asyncio
import dataclasses
import logging

import pytest

from swarmlm import serialize
from swarmlm.errors import PeerError, WireError
from swarmlm.p2p import direct, rpc


async def _echo(peer_id, reader, writer):
    tag, payload = await rpc.read_frame(reader, max_bytes=1 << 20)
    await rpc.write_frame(writer, rpc.DATA, peer_id.encode() + b":" + payload)


async def _listener():
    return await direct.DirectListener.start("127.0.0.1", _echo)


async def _roundtrip(offer, peer_id, payload=b"hi"):
    reader, writer = await direct.connect(offer, peer_id, timeout_s=5)
    try:
        await rpc.write_frame(writer, rpc.REQUEST, payload)
        return (await rpc.read_frame(reader, max_bytes=1 << 20))[1]
    finally:
        writer.close()


def test_a_ticket_lets_its_peer_through_and_names_it_to_the_handler():
    async def go():
        listener = await _listener()
        try:
            assert await _roundtrip(listener.offer("alice"), "alice") == b"alice:hi"
            assert listener.refused == 0
        finally:
            await listener.close()
    asyncio.run(go())


@pytest.mark.parametrize("forge", ["other_peer", "flipped_bit", "expired", "other_listener"])
def test_a_wrong_ticket_is_refused_and_the_listener_goes_on(forge, caplog):
    async def go():
        listener, other = await _listener(), await _listener()
        try:
            offer = listener.offer("alice")
            peer = "alice"
            if forge == "other_peer":
                peer = "mallory"
            elif forge == "flipped_bit":
                offer = dataclasses.replace(offer, ticket=bytes([offer.ticket[0] ^ 1]) + offer.ticket[1:])
            elif forge == "expired":
                offer = listener.offer("alice", ttl_s=-1)
            else:
                offer = dataclasses.replace(other.offer("alice"), port=listener.port)
            with caplog.at_level(logging.INFO, logger="swarmlm"), pytest.raises(PeerError, match="refused"):
                await _roundtrip(offer, peer)
            assert listener.refused == 1
            assert await _roundtrip(listener.offer("bob"), "bob") == b"bob:hi"
        finally:
            await listener.close()
            await other.close()
    asyncio.run(go())


@pytest.mark.parametrize("hello", [
    b"\x07\x00\x00\x00\x01x",                                   # unknown frame tag
    b"\x01\x00\x00\x00\x02hi",                                  # DATA, not a hello
    b"\x00\x7f\xff\xff\xff",                                    # a hello that claims 2 GiB
    b"\x00\x00\x00\x00\x03abc",                                 # not msgpack
    rpc._HEADER.pack(rpc.REQUEST, 3) + serialize.pack([1, 2]),  # wrong type
])
def test_a_malformed_hello_is_refused_with_an_error_frame(hello):
    async def go():
        listener = await _listener()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
            writer.write(hello)
            await writer.drain()
            tag, payload = await asyncio.wait_for(rpc.read_frame(reader, max_bytes=0), 5)
            assert tag == rpc.ERROR and payload.startswith(b"refused")
            writer.close()
            assert listener.refused == 1
            assert await _roundtrip(listener.offer("bob"), "bob") == b"bob:hi"
        finally:
            await listener.close()
    asyncio.run(go())


def test_a_silent_connection_is_dropped_after_the_hello_timeout(monkeypatch):
    monkeypatch.setattr(direct, "HELLO_TIMEOUT_S", 0.2)

    async def go():
        listener = await _listener()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
            tag, _ = await asyncio.wait_for(rpc.read_frame(reader, max_bytes=0), 5)
            assert tag == rpc.ERROR and listener.refused == 1
            writer.close()
        finally:
            await listener.close()
    asyncio.run(go())


def test_dialing_a_closed_port_is_a_peer_error():
    async def go():
        listener = await _listener()
        offer = listener.offer("alice")
        await listener.close()
        with pytest.raises(PeerError):
            await direct.connect(offer, "alice", timeout_s=5)
    asyncio.run(go())


@pytest.mark.parametrize("bad", [dict(port=0), dict(port=70000), dict(port="80"), dict(host=""),
                                 dict(host=7), dict(ticket=b"short"), dict(ticket="x" * 32)])
def test_a_malformed_offer_is_a_wire_error(bad):
    good = direct.Offer(host="127.0.0.1", port=4001, expires=1e12, ticket=b"t" * 32)
    with pytest.raises(WireError):
        direct.check_offer(dataclasses.replace(good, **bad))


async def _serve_frames(frames, *, cut_last: bool = False):
    """A listener whose handler sends `frames` (then half of one more, if `cut_last`) and closes."""
    async def handler(peer_id, reader, writer):
        for payload in frames:
            await rpc.write_frame(writer, rpc.DATA, payload)
        if cut_last:
            writer.write(rpc._HEADER.pack(rpc.DATA, 1000) + b"x" * 10)
            await writer.drain()
    return await direct.DirectListener.start("127.0.0.1", handler)


def test_large_and_small_frames_arrive_intact_even_when_read_late():
    import random
    rng = random.Random(0)
    frames = [rng.randbytes(n) for n in (5, 300_000, 1, 70_000, 262_144, 0, 3)] * 3

    async def go():
        listener = await _serve_frames(frames)
        try:
            reader, writer = await direct.connect(listener.offer("alice"), "alice", timeout_s=5)
            await asyncio.sleep(0.2)                     # let the sender run ahead: buffered, then paused
            got = [bytes((await rpc.read_frame(reader, max_bytes=1 << 20))[1]) for _ in frames]
            writer.close()
            assert got == frames
        finally:
            await listener.close()
    asyncio.run(go())


def test_a_connection_cut_mid_frame_is_an_incomplete_read():
    async def go():
        listener = await _serve_frames([b"whole"], cut_last=True)
        try:
            reader, writer = await direct.connect(listener.offer("alice"), "alice", timeout_s=5)
            assert (await rpc.read_frame(reader, max_bytes=1 << 20))[1] == b"whole"
            with pytest.raises(asyncio.IncompleteReadError):
                await rpc.read_frame(reader, max_bytes=1 << 20)
            writer.close()
        finally:
            await listener.close()
    asyncio.run(go())
