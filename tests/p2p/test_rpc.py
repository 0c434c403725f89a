"""Framing: unary status bytes, stream frames and their limits."""

import asyncio

import pytest

from swarmlm.errors import PeerError, PeerTimeout, RemoteError
from swarmlm.p2p import rpc


def test_error_reply_becomes_remote_error_with_its_message():
    with pytest.raises(RemoteError, match="nope"):
        rpc.parse_reply(rpc.error_reply("nope"), peer_id="p", name="x", max_bytes=10)


@pytest.mark.parametrize("reply", [b"", b"\x07abc"])
def test_malformed_reply_is_peer_error(reply):
    with pytest.raises(PeerError):
        rpc.parse_reply(reply, peer_id="p", name="x", max_bytes=10)


def test_oversized_reply_is_peer_error():
    with pytest.raises(PeerError):
        rpc.parse_reply(rpc.ok_reply(b"x" * 11), peer_id="p", name="x", max_bytes=10)


def _reader(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


def test_frame_longer_than_limit_is_refused_before_reading_it():
    async def go():
        reader = _reader(b"\x01" + (10**9).to_bytes(4, "big"))
        with pytest.raises(PeerError, match="exceeds"):
            await rpc.read_frame(reader, max_bytes=1024)
    asyncio.run(go())


def test_truncated_stream_ends_in_peer_error():
    async def go():
        reader = _reader(b"\x01\x00\x00\x00\x05ab")
        with pytest.raises(PeerError, match="closed"):
            [c async for c in rpc.read_stream(reader, peer_id="p", name="x", timeout_s=1, max_chunk_bytes=10)]
    asyncio.run(go())


def test_unary_handler_exception_becomes_error_reply():
    async def bad(peer_id, request):
        raise KeyError("missing")
    reply = asyncio.run(rpc.run_unary(bad, "p", b"", name="x", max_request_bytes=10))
    with pytest.raises(RemoteError, match="KeyError"):
        rpc.parse_reply(reply, peer_id="p", name="x", max_bytes=10)


# ---- channels over MemoryPeer raw streams ------------------------------------------------

async def _channel_pair(handler, *, max_request_bytes=64, idle_timeout_s=30.0):
    from swarmlm.p2p.memory import MemoryNetwork, MemoryPeer
    net = MemoryNetwork()
    server, client = await MemoryPeer.create(net), await MemoryPeer.create(net)

    async def serve(peer_id, reader, writer):
        await rpc.serve_channel(handler, peer_id, reader, writer, name="ch", max_request_bytes=max_request_bytes,
                                idle_timeout_s=idle_timeout_s)

    await server.add_raw_stream_handler("ch", serve)
    reader, writer = await client.open_raw_stream(server.peer_id, "ch")
    return net, server, rpc.Channel(reader, writer, peer_id=server.peer_id, name="ch"), (reader, writer)


async def _upper(peer_id, request):
    if request == b"boom":
        raise ValueError("boom requested")
    if request == b"slow":
        await asyncio.sleep(10)
    return request.upper()


def test_channel_answers_many_requests_in_order_and_survives_handler_errors():
    async def go():
        _, _, ch, _ = await _channel_pair(_upper)
        first = await ch.call(b"ab", timeout_s=5, max_response_bytes=64)
        with pytest.raises(RemoteError, match="boom requested"):
            await ch.call(b"boom", timeout_s=5, max_response_bytes=64)
        second = await ch.call(b"cd", timeout_s=5, max_response_bytes=64)
        ch.close()
        return first, second, ch.broken

    assert asyncio.run(go()) == (b"AB", b"CD", "closed")


def test_channel_oversized_request_gets_an_error_frame_then_the_channel_ends():
    async def go():
        _, server, ch, _ = await _channel_pair(_upper, max_request_bytes=8)
        with pytest.raises(RemoteError, match="exceeds"):
            await ch.call(b"x" * 9, timeout_s=5, max_response_bytes=64)
        ch.close()
        await asyncio.wait_for(asyncio.gather(*server._serving), 5)
        return len(server._serving)

    assert asyncio.run(go()) == 0


@pytest.mark.parametrize("frame", [b"\x09\x00\x00\x00\x00", b"\x01\x00\x00\x00\x02hi"])
def test_channel_frame_of_unknown_or_wrong_tag_gets_an_error_frame(frame):
    async def go():
        _, _, _, (reader, writer) = await _channel_pair(_upper)
        writer.write(frame)
        tag, payload = await asyncio.wait_for(rpc.read_frame(reader, max_bytes=1024), 5)
        return tag, payload

    tag, payload = asyncio.run(go())
    assert tag == rpc.ERROR and payload


def test_channel_reply_over_the_callers_limit_breaks_the_channel():
    async def go():
        _, _, ch, _ = await _channel_pair(_upper)
        with pytest.raises(PeerError, match="exceeds"):
            await ch.call(b"abcdef", timeout_s=5, max_response_bytes=4)
        return ch.broken

    assert asyncio.run(go())


def test_channel_timeout_breaks_it_for_later_calls():
    async def go():
        _, _, ch, _ = await _channel_pair(_upper)
        with pytest.raises(PeerTimeout):
            await ch.call(b"slow", timeout_s=0.05, max_response_bytes=64)
        with pytest.raises(PeerError, match="broken"):
            await ch.call(b"ab", timeout_s=5, max_response_bytes=64)

    asyncio.run(go())


def test_channel_requests_in_flight_together_get_their_own_replies_in_order():
    async def go():
        _, _, ch, _ = await _channel_pair(_upper)
        replies = [ch.send(r, timeout_s=5, max_response_bytes=64) for r in (b"ab", b"boom", b"cd")]  # all written now
        got = await asyncio.gather(*replies, return_exceptions=True)
        return got[0], type(got[1]).__name__, got[2], ch.broken

    assert asyncio.run(go()) == (b"AB", "RemoteError", b"CD", None)


def test_a_call_given_up_before_its_reply_breaks_the_channel_and_the_calls_behind_it():
    async def go():
        started = asyncio.Event()

        async def handler(peer_id, request):
            if request == b"slow":
                started.set()               # the server is working on it: its reply is on its way
            return await _upper(peer_id, request)

        _, _, ch, _ = await _channel_pair(handler)
        slow = asyncio.ensure_future(ch.send(b"slow", timeout_s=30, max_response_bytes=64))
        behind = asyncio.ensure_future(ch.send(b"ab", timeout_s=30, max_response_bytes=64))
        await asyncio.wait_for(started.wait(), 10)
        slow.cancel()
        with pytest.raises(PeerError, match="broken"):
            await behind                  # its reply would be the slow one's
        with pytest.raises(PeerError, match="broken"):
            await ch.call(b"cd", timeout_s=5, max_response_bytes=64)
        return ch.broken

    assert "given up" in asyncio.run(go())


def test_a_reply_nobody_awaits_is_still_read_in_its_turn():
    async def go():
        _, _, ch, _ = await _channel_pair(_upper)
        ch.send(b"ab", timeout_s=5, max_response_bytes=64)          # fire and forget
        return await ch.call(b"cd", timeout_s=5, max_response_bytes=64), ch.broken

    assert asyncio.run(go()) == (b"CD", None)


def test_a_call_cancelled_before_it_ran_breaks_the_channel_instead_of_stalling_the_next():
    async def go():
        _, _, ch, _ = await _channel_pair(_upper)
        ch.send(b"ab", timeout_s=30, max_response_bytes=64).cancel()   # the loop never ran it
        with pytest.raises(PeerError):                                  # at once, not after 30 s
            await asyncio.wait_for(ch.call(b"cd", timeout_s=30, max_response_bytes=64), 5)
        return ch.broken

    assert "given up" in asyncio.run(go())


def test_channel_to_a_killed_peer_fails_with_peer_error():
    async def go():
        net, server, ch, _ = await _channel_pair(_upper)
        await ch.call(b"ab", timeout_s=5, max_response_bytes=64)
        net.kill(server.peer_id)
        with pytest.raises(PeerError):
            await ch.call(b"cd", timeout_s=5, max_response_bytes=64)

    asyncio.run(go())


def test_idle_channel_is_closed_by_the_server():
    async def go():
        _, _, ch, _ = await _channel_pair(_upper, idle_timeout_s=0.05)
        await asyncio.sleep(0.2)
        with pytest.raises(PeerError):
            await ch.call(b"ab", timeout_s=5, max_response_bytes=64)

    asyncio.run(go())
