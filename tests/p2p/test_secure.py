"""Encrypted direct connections: only the holder of an expected key gets through, every record is
sealed (nothing in the clear on the wire), and a forged, replayed, cut or oversized record ends
the connection with a PeerError while the listener goes on serving others."""

import asyncio
import logging
import struct

import pytest

from swarmlm.errors import PeerError, RemoteError
from swarmlm.p2p import rpc, secure

SECRET = b"the prompt nobody else may read"


async def _echo_channel(peer_id, reader, writer):
    async def echo(pid, request):
        if request == b"fail":
            raise ValueError("asked to fail")
        return pid.encode() + b":" + request
    await rpc.serve_channel(echo, peer_id, reader, writer, name="echo", max_request_bytes=1 << 20,
                            idle_timeout_s=30)


async def _listener(**kwargs):
    return await secure.SecureListener.start("127.0.0.1", _echo_channel, max_record_bytes=(1 << 20) + 16, **kwargs)


async def _keyed_channel(listener, peer="alice", *, port=None):
    """A fresh key, expected by `listener` for `peer`, and a channel under it."""
    key = secure.new_key()
    listener.expect(key, peer)
    return await _channel(listener, key, port=port)


async def _channel(listener, key, *, port=None):
    """A channel to `listener` (or through whatever listens on `port`) keyed by `key`."""
    reader, writer = await secure.connect_secure("127.0.0.1", port or listener.port, key, timeout_s=5,
                                                 max_record_bytes=(1 << 20) + 16)
    return rpc.Channel(reader, writer, peer_id="server", name="echo")


def test_an_expected_key_opens_a_channel_that_names_the_key_sender():
    async def go():
        listener = await _listener()
        try:
            channel = await _keyed_channel(listener)
            assert await channel.call(b"hi", timeout_s=5, max_response_bytes=1 << 20) == b"alice:hi"
            with pytest.raises(RemoteError, match="asked to fail"):
                await channel.call(b"fail", timeout_s=5, max_response_bytes=1 << 20)
            big = bytes(range(256)) * 4096                   # 1 MiB: one record, several TCP segments
            assert await channel.call(big, timeout_s=5, max_response_bytes=2 << 20) == b"alice:" + big
            channel.close()
            assert listener.refused == 0
        finally:
            await listener.close()
    asyncio.run(go())


@pytest.mark.parametrize("case", ["unknown_key", "used_twice", "expired", "bad_magic"])
def test_a_connection_without_an_expected_key_is_refused_and_the_listener_goes_on(case, caplog):
    async def go():
        now = [100.0]
        listener = await _listener(clock=lambda: now[0])
        try:
            key = secure.new_key()
            if case == "used_twice":
                listener.expect(key, "alice")
                (await _channel(listener, key)).close()
            elif case == "expired":
                listener.expect(key, "alice", ttl_s=5)
                now[0] += 6
            with caplog.at_level(logging.INFO, logger="swarmlm"):
                if case == "bad_magic":
                    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
                    writer.write(b"XXXX" + secure.key_id(key))
                    assert await asyncio.wait_for(reader.read(), 5) == b""      # closed without a word
                    writer.close()
                else:
                    with pytest.raises(PeerError, match="refused"):
                        await _channel(listener, key)
            assert listener.refused == 1
            good = secure.new_key()
            listener.expect(good, "bob")
            channel = await _channel(listener, good)
            assert await channel.call(b"still here", timeout_s=5, max_response_bytes=1 << 20) == b"bob:still here"
            channel.close()
        finally:
            await listener.close()
    asyncio.run(go())


class _Tap:
    """A TCP relay between a client and the listener that records and can tamper with client bytes."""

    def __init__(self, listener_port, tamper=None):
        self.listener_port = listener_port
        self.tamper = tamper or (lambda chunk: chunk)
        self.seen = bytearray()
        self.server = None

    async def start(self):
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _relay(self, reader, writer):
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.listener_port)

        async def pump(src, dst, tamper):
            try:
                while chunk := await src.read(1 << 16):
                    self.seen += chunk
                    dst.write(tamper(chunk))
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()
        await asyncio.gather(pump(reader, up_writer, self.tamper), pump(up_reader, writer, lambda c: c))

    def close(self):
        self.server.close()


def test_nothing_crosses_the_wire_in_the_clear():
    async def go():
        listener = await _listener()
        tap = _Tap(listener.port)
        port = await tap.start()
        try:
            key = secure.new_key()
            listener.expect(key, "alice")
            channel = await _channel(listener, key, port=port)
            assert await channel.call(SECRET, timeout_s=5, max_response_bytes=1 << 20) == b"alice:" + SECRET
            channel.close()
            assert SECRET not in tap.seen and key not in tap.seen and len(tap.seen) > len(SECRET)
        finally:
            tap.close()
            await listener.close()
    asyncio.run(go())


def test_a_tampered_record_breaks_the_connection_and_nothing_forged_is_served():
    async def go():
        served = []

        async def record(peer_id, reader, writer):
            async def handler(pid, request):
                served.append(request)
                return b"ok"
            await rpc.serve_channel(handler, peer_id, reader, writer, name="x", max_request_bytes=1 << 20,
                                    idle_timeout_s=30)
        listener = await secure.SecureListener.start("127.0.0.1", record, max_record_bytes=1 << 20)
        flips = {"n": 0}

        def flip_after_hello(chunk):
            flips["n"] += 1
            if flips["n"] == 1:
                return chunk                       # the hello (magic + key id)
            return chunk[:-1] + bytes([chunk[-1] ^ 1])
        tap = _Tap(listener.port, flip_after_hello)
        port = await tap.start()
        try:
            channel = await _keyed_channel(listener, port=port)
            with pytest.raises(PeerError):
                await channel.call(b"transfer 10 coins", timeout_s=5, max_response_bytes=1 << 20)
            assert served == []
        finally:
            tap.close()
            await listener.close()
    asyncio.run(go())


def test_a_replayed_or_reordered_record_fails_its_tag():
    async def go():
        server_reader = asyncio.StreamReader()
        key = secure.new_key()
        c2s, _ = secure._direction_keys(key)
        reader = secure.SecureReader(server_reader, c2s, max_record_bytes=1 << 10)

        class Sink:
            def __init__(self):
                self.data = bytearray()

            def write(self, b):
                self.data += b
        sink = Sink()
        writer = secure.SecureWriter(sink, c2s)
        writer.write(b"first")
        first = bytes(sink.data)
        writer.write(b"second")
        server_reader.feed_data(first)
        assert await reader.read_record() == b"first"
        server_reader.feed_data(first)                       # the same record again
        with pytest.raises(PeerError, match="authentication tag"):
            await reader.read_record()
    asyncio.run(go())


def test_an_oversized_record_is_refused_before_it_is_read():
    async def go():
        server_reader = asyncio.StreamReader()
        reader = secure.SecureReader(server_reader, secure._direction_keys(secure.new_key())[0],
                                     max_record_bytes=1024)
        server_reader.feed_data(struct.pack(">I", 1 << 30))    # claims a 1 GiB record, sends nothing more
        with pytest.raises(PeerError, match="limit"):
            await asyncio.wait_for(reader.read_record(), 5)
    asyncio.run(go())


def test_a_listener_killed_mid_channel_is_a_peer_error_at_the_caller():
    async def go():
        listener = await _listener()
        channel = await _keyed_channel(listener)
        assert await channel.call(b"one", timeout_s=5, max_response_bytes=1 << 20) == b"alice:one"
        listener.abort()
        await asyncio.sleep(0.05)
        with pytest.raises(PeerError):
            await channel.call(b"two", timeout_s=5, max_response_bytes=1 << 20)
        await listener.close()
    asyncio.run(go())


@pytest.mark.parametrize("bad", [b"", b"short", b"x" * 33, "a string of thirty-two characters"])
def test_a_malformed_key_is_refused(bad):
    async def go():
        listener = await _listener()
        try:
            with pytest.raises(Exception, match="32 bytes"):
                listener.expect(bad, "alice")
            with pytest.raises(Exception, match="32 bytes"):
                await secure.connect_secure("127.0.0.1", listener.port, bad, timeout_s=1, max_record_bytes=10)
        finally:
            await listener.close()
    asyncio.run(go())


def test_dialing_a_closed_port_is_a_peer_error():
    async def go():
        listener = await _listener()
        port = listener.port
        await listener.close()
        with pytest.raises(PeerError):
            await secure.connect_secure("127.0.0.1", port, secure.new_key(), timeout_s=2, max_record_bytes=10)
    asyncio.run(go())
