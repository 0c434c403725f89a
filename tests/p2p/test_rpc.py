"""Framing: unary status bytes, stream frames and their limits."""

import asyncio

import pytest

from swarmlm.errors import PeerError, RemoteError
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
