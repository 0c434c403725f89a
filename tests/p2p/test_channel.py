"""The side channel: keys offered over libp2p (here MemoryPeer's), real TCP on 127.0.0.1.

Only the dialer that offered a key gets through, as itself; every record is sealed (nothing in
the clear on the wire); a record altered, replayed, reordered, cut, oversized or under a wrong
key ends that connection with a PeerError while the listener goes on serving others; and a peer
dials only what its target announced, under its signature. Every test runs on asyncio's loop and
on uvloop (p2p/loop.py: servers and swarm clients run on it), whose transports read differently."""

import asyncio

import pytest

from swarmlm.errors import IntegrityError, PeerError
from swarmlm.p2p import keys, rpc
from swarmlm.p2p.channel import policy
from swarmlm.p2p.channel.conn import Connection
from swarmlm.p2p.channel.service import Endpoint, SideChannel
from swarmlm.p2p.identity import Identity
from swarmlm.p2p.memory import MemoryNetwork, MemoryPeer
from swarmlm.p2p.records import seal
from tests.helpers.sockets import CountingListener



@pytest.fixture(autouse=True, params=["asyncio", "uvloop"])
def event_loop_kind(request):
    """`asyncio.run` in each test makes its loop of this kind."""
    if request.param == "asyncio":
        yield
        return
    uvloop = pytest.importorskip("uvloop")
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(None)


SECRET = b"the prompt nobody else may read" * 8
LIMIT = 1 << 20


async def _echo(conn: Connection) -> None:
    async def echo(pid, request):
        if request == b"fail":
            raise ValueError("asked to fail")
        return pid.encode() + b":" + request
    await rpc.serve_channel(echo, conn.peer_id, conn, conn, name="echo", max_request_bytes=LIMIT, idle_timeout_s=30)


async def _echo_dispatched(conn: Connection) -> None:
    """`_echo`, with records that start with "!" answered in the connection's callback (no task)."""
    def handle(plain):
        if plain is None or plain[:1] != b"!":
            return False
        conn.write(b"!" + conn.peer_id.encode() + b":" + plain[1:])
        return True
    conn.set_record_handler(handle)
    await _echo(conn)


async def _pair(dispatched=False):
    """A listener peer serving "echo" (records dispatched as they arrive, or read by its task), and a dialer peer."""
    net = MemoryNetwork()
    server, client = await MemoryPeer.create(net), await MemoryPeer.create(net)
    side = await server.side_channel()
    await side.serve("echo", _echo_dispatched if dispatched else _echo, max_record_bytes=LIMIT + 64)
    return net, server, client, side


async def _channel(client, server):
    conn = await (await client.side_channel()).open(server.peer_id, "echo", timeout_s=5, max_record_bytes=LIMIT + 64)
    return conn, rpc.Channel(conn, conn, peer_id=server.peer_id, name="echo")


async def _still_serves(client, server):
    _, channel = await _channel(client, server)
    assert await channel.call(b"again", timeout_s=5, max_response_bytes=LIMIT) == client.peer_id.encode() + b":again"
    channel.close()


def _capture(conn: Connection, send) -> bytes:
    """What `send()` would put on the wire through `conn`, kept back instead."""
    sent = []
    real = conn.write_raw
    conn.write_raw = lambda data: sent.append(bytes(data))
    try:
        send()
    finally:
        conn.write_raw = real
    return b"".join(sent)


def test_an_offered_key_opens_a_connection_that_names_the_dialer():
    async def go():
        _, server, client, side = await _pair()
        conn, channel = await _channel(client, server)
        assert conn.peer_id == server.peer_id
        assert await channel.call(b"hi", timeout_s=5, max_response_bytes=LIMIT) == client.peer_id.encode() + b":hi"
        big = bytes(range(256)) * 4096                          # 1 MiB: one record, many TCP segments
        assert await channel.call(big, timeout_s=5, max_response_bytes=2 * LIMIT) == client.peer_id.encode() + b":" + big
        channel.close()
        assert side.accepted == 1 and side.refused == 0
        await client.shutdown()
        await server.shutdown()
    asyncio.run(go())


def test_nothing_readable_crosses_the_wire():
    async def go():
        _, server, client, side = await _pair()
        conn, channel = await _channel(client, server)
        wire = _capture(conn, lambda: rpc.Channel(conn, conn, peer_id="x", name="echo").send(
            SECRET, timeout_s=5, max_response_bytes=LIMIT).cancel())
        assert SECRET[:16] not in wire and len(wire) > len(SECRET)
        channel.close()
        await client.shutdown()
        await server.shutdown()
    asyncio.run(go())


@pytest.mark.parametrize("dispatched", [False, True], ids=["read", "dispatched"])
@pytest.mark.parametrize("attack", ["altered", "replayed", "reordered", "cut", "oversized"])
def test_a_tampered_record_ends_the_connection_and_the_listener_goes_on(attack, dispatched):
    async def go():
        _, server, client, side = await _pair(dispatched)
        conn, _ = await _channel(client, server)
        one = _capture(conn, lambda: conn.write(rpc._HEADER.pack(rpc.REQUEST, 3) + b"one"))
        two = _capture(conn, lambda: conn.write(rpc._HEADER.pack(rpc.REQUEST, 3) + b"two"))
        if attack == "altered":
            wire = one[:-1] + bytes([one[-1] ^ 1])
        elif attack == "replayed":
            wire = one + one
        elif attack == "reordered":
            wire = two + one
        elif attack == "cut":
            wire = one[:len(one) // 2]
        else:
            wire = (LIMIT + 64 + 17).to_bytes(4, "big") + b"x" * 32
        conn.write_raw(wire)
        if attack == "cut":
            conn._transport.write_eof()
        got = []
        while True:          # the listener answers what was genuine, then an error, and ends the connection
            try:
                record = await asyncio.wait_for(conn.read_record(), 5)
            except (asyncio.IncompleteReadError, ConnectionError, PeerError):
                break
            got.append(record)
            if record[:1] == bytes([rpc.ERROR]):
                break
        assert all(b"two" not in r for r in got)
        if attack == "replayed":
            assert got[0].endswith(b":one")                 # the genuine record, once
            got = got[1:]
        assert all(b":one" not in r for r in got)
        conn.close()
        await _still_serves(client, server)
        await client.shutdown()
        await server.shutdown()
    asyncio.run(go())


def test_a_wrong_or_used_key_is_refused_before_anything_is_served():
    async def go():
        _, server, client, side = await _pair()
        conn, channel = await _channel(client, server)
        channel.close()
        loop = asyncio.get_running_loop()
        for hello in (b"SLC1" + b"\0" * 16, b"XXXX" + b"\0" * 16):
            _, raw = await loop.create_connection(Connection, "127.0.0.1", side.port)
            raw.write_raw(hello)
            with pytest.raises(asyncio.IncompleteReadError):
                await asyncio.wait_for(raw.read_raw(1), 5)
        assert side.refused == 2 and side.accepted == 1
        await _still_serves(client, server)
        await client.shutdown()
        await server.shutdown()
    asyncio.run(go())


def test_a_key_is_bound_to_both_peers():
    """A key offered to one peer, presented at another's listener, opens nothing there."""
    async def go():
        net, server, client, side = await _pair()
        other = await MemoryPeer.create(net)
        other_side = await other.side_channel()
        await other_side.serve("echo", _echo, max_record_bytes=LIMIT)
        # the client believes `server` listens where `other` does (a forged hint is refused first,
        # so plant it in the cache as a bug elsewhere might)
        client_side = await client.side_channel()
        client_side._resolved[server.peer_id] = (other_side.addrs, client_side.clock() + 60)
        with pytest.raises(PeerError):
            await client_side.open(server.peer_id, "echo", timeout_s=5, max_record_bytes=LIMIT)
        assert other_side.accepted == 0 and other_side.refused == 1
        for p in (client, server, other):
            await p.shutdown()
    asyncio.run(go())


def test_an_unserved_purpose_is_refused_over_libp2p():
    async def go():
        _, server, client, side = await _pair()
        with pytest.raises(PeerError, match="no side-channel purpose"):
            await (await client.side_channel()).open(server.peer_id, "nope", timeout_s=5, max_record_bytes=LIMIT)
        assert side.accepted == 0
        await client.shutdown()
        await server.shutdown()
    asyncio.run(go())


def test_a_record_decrypts_straight_into_the_callers_buffer():
    async def go():
        net, server, client, _ = await _pair()
        got = asyncio.get_running_loop().create_future()

        async def sink(conn):
            buf = bytearray(300_000)
            n = await conn.read_record_into(buf)
            got.set_result(bytes(buf[:n]))
        await (await server.side_channel()).serve("sink", sink, max_record_bytes=LIMIT)
        conn = await (await client.side_channel()).open(server.peer_id, "sink", timeout_s=5, max_record_bytes=LIMIT)
        payload = bytes(range(256)) * 1024
        conn.write(payload)
        assert await asyncio.wait_for(got, 5) == payload
        conn.close()
        await client.shutdown()
        await server.shutdown()
    asyncio.run(go())


# ---- dial policy ---------------------------------------------------------------------------------

def test_only_ip_literals_with_a_port_are_dialable():
    assert policy.dialable(["/ip4/127.0.0.1/tcp/5"], local_host="127.0.0.1") == [("127.0.0.1", 5)]
    assert policy.dialable(["/ip6/::1/tcp/7"], local_host="::1") == [("::1", 7)]
    for bad in ["/dns4/localhost/tcp/5", "/ip4/localhost/tcp/5", "/ip4/127.0.0.1/tcp/0", "/ip4/0.0.0.0/tcp/5",
                "/ip4/127.0.0.1/udp/5", "/ip4/127.0.0.1/tcp/5/p2p/Qm", "/ip6/127.0.0.1/tcp/5", "127.0.0.1:5"]:
        assert policy.dialable([bad], local_host="127.0.0.1") == [], bad
    # a remote peer cannot steer a peer on a real interface into its own loopback services
    assert policy.dialable(["/ip4/127.0.0.1/tcp/5", "/ip4/10.1.2.3/tcp/5"], local_host="10.0.0.1") == [("10.1.2.3", 5)]


def test_dials_per_asking_peer_are_capped_in_a_window():
    now = [0.0]
    limiter = policy.DialLimiter(max_dials=2, window_s=10, clock=lambda: now[0])
    assert limiter.allow("a") and limiter.allow("a") and not limiter.allow("a")
    assert limiter.allow("b")
    now[0] = 10.5
    assert limiter.allow("a")


def test_a_peer_dials_only_what_its_target_announced_under_its_signature():
    async def go():
        net, server, client, side = await _pair()
        trap = CountingListener()
        client_side = await client.side_channel()
        other = await MemoryPeer.create(net)
        await (await other.side_channel()).serve("echo", _echo, max_record_bytes=LIMIT)
        other_endpoint = (await other.side_channel()).sealed_endpoint()
        stranger = Identity.generate()
        forged = {
            # a port of 127.0.0.1 the target never announced, signed by someone else
            "unannounced port": seal(stranger, keys.endpoint_key(server.peer_id),
                                     Endpoint([f"/ip4/127.0.0.1/tcp/{trap.port}"]), expires_at=2e9,
                                     subkey=keys.peer_subkey(stranger.peer_id)),
            # another peer's own genuine record, passed off as the target's
            "another peer's address": other_endpoint,
            # a host name, even signed by the target itself: no DNS look-up on a peer's word
            "host name": seal(server.identity, keys.endpoint_key(server.peer_id),
                              Endpoint([f"/dns4/localhost/tcp/{trap.port}"]), expires_at=2e9,
                              subkey=keys.peer_subkey(server.peer_id)),
        }
        for why, sealed in forged.items():
            with pytest.raises(PeerError, match="refusing to dial"):
                await client_side.open(server.peer_id, "echo", timeout_s=5, max_record_bytes=LIMIT, endpoint=sealed)
        assert trap.accepted() == 0
        # what the target does announce is dialed (here a port where nobody holds our key)
        await server.store(keys.endpoint_key(server.peer_id), Endpoint([f"/ip4/127.0.0.1/tcp/{trap.port}"]),
                           ttl_s=1200, subkey=keys.peer_subkey(server.peer_id))
        client_side._resolved.clear()
        with pytest.raises(PeerError):
            await client_side.open(server.peer_id, "echo", timeout_s=2, max_record_bytes=LIMIT)
        assert trap.accepted() == 1                      # the announced (if useless) address, nothing else
        await client.shutdown()
        await server.shutdown()
    asyncio.run(go())


def test_a_sealed_endpoint_of_another_peer_or_expired_is_not_learned():
    async def go():
        _, server, client, side = await _pair()
        client_side = await client.side_channel()
        await client_side.serve("echo", _echo, max_record_bytes=LIMIT)
        with pytest.raises(IntegrityError):
            client_side.learn(server.peer_id, client_side.sealed_endpoint())
        assert client_side.learn(server.peer_id, side.sealed_endpoint()) == side.addrs
        await client.shutdown()
        await server.shutdown()
    asyncio.run(go())


def test_the_listener_binds_the_peers_host_only_and_a_peer_that_only_dials_listens_nowhere():
    async def go():
        _, server, client, side = await _pair()
        assert [s.getsockname()[0] for s in side._server.sockets] == ["127.0.0.1"]
        await _still_serves(client, server)
        assert (await client.side_channel())._server is None
        await client.shutdown()
        await server.shutdown()
    asyncio.run(go())


def test_a_side_channel_on_all_interfaces_announces_the_peers_own_addresses_not_the_wildcard():
    class Stub:                       # nothing listens: only what would be announced is computed
        peer_id = "stub"
        maddrs = ["/ip4/0.0.0.0/tcp/4001/p2p/x", "/ip4/10.1.2.3/tcp/4001/p2p/x", "/dns4/example/tcp/1/p2p/x",
                  "/ip6/fd00::5/tcp/4001/p2p/x"]
    side = SideChannel(Stub(), host="0.0.0.0", clock=lambda: 0.0)
    side.port = 5555
    assert side.addrs == ["/ip4/10.1.2.3/tcp/5555", "/ip6/fd00::5/tcp/5555"]
    Stub.maddrs = ["/ip4/0.0.0.0/tcp/4001/p2p/x"]
    assert side.addrs == [] and side.sealed_endpoint() is None
    assert SideChannel(Stub(), host="127.0.0.1", clock=lambda: 0.0).addrs == ["/ip4/127.0.0.1/tcp/0"]


def test_a_killed_peer_loses_its_dialed_connections_too():
    async def go():
        net, server, client, side = await _pair()
        conn, channel = await _channel(client, server)
        net.kill(client.peer_id)                      # as a SIGKILL: every socket of the client goes
        await asyncio.wait_for(conn.closed.wait(), 5)
        await _still_serves(await MemoryPeer.create(net), server)
        await server.shutdown()
    asyncio.run(go())


def test_several_writers_may_wait_for_one_drain():
    async def go():
        _, server, client, side = await _pair()
        conn, _ = await _channel(client, server)
        conn.pause_writing()                          # as the transport does with a full send buffer
        waiters = [asyncio.ensure_future(conn.drain()) for _ in range(3)]
        await asyncio.sleep(0)
        assert not any(w.done() for w in waiters)
        conn.resume_writing()
        await asyncio.wait_for(asyncio.gather(*waiters), 5)
        conn.close()
        await client.shutdown()
        await server.shutdown()
    asyncio.run(go())


def test_dispatched_records_are_answered_in_the_callback_and_the_rest_read_in_their_order():
    async def go():
        _, server, client, side = await _pair(dispatched=True)
        conn, _ = await _channel(client, server)
        frames = [rpc.frame(rpc.REQUEST, b"x" * 70_000), rpc.frame(rpc.REQUEST, b"y")]
        sent = [b"!a", frames[0][:3], frames[0][3:], b"!b", frames[1], b"!" + b"c" * 300_000]
        wire = b"".join(_capture(conn, lambda r=r: conn.write(r)) for r in sent)
        conn.write_raw(wire)                       # all at once: several records in one receive, one cut in two
        got = [await asyncio.wait_for(conn.read_record(), 5) for _ in range(5)]
        me = client.peer_id.encode()
        fast = [r for r in got if r[:1] == b"!"]
        slow = [rpc._HEADER.unpack(r[:5]) + (r[5:],) for r in got if r[:1] != b"!"]
        assert fast == [b"!" + me + b":a", b"!" + me + b":b", b"!" + me + b":" + b"c" * 300_000]
        assert slow == [(rpc.DATA, len(me) + 70_001, me + b":" + b"x" * 70_000), (rpc.DATA, len(me) + 2, me + b":y")]
        conn.close()
        await _still_serves(client, server)
        await client.shutdown()
        await server.shutdown()
    asyncio.run(go())


def test_a_dispatching_connection_tells_its_handler_once_that_it_is_lost():
    async def go():
        _, server, client, side = await _pair()
        conn, _ = await _channel(client, server)
        seen = []
        conn.set_record_handler(lambda plain: seen.append(plain) or False)
        await server.shutdown()                    # the listener's side goes away
        await asyncio.wait_for(conn.closed.wait(), 10)
        assert seen == [None]
        with pytest.raises((asyncio.IncompleteReadError, ConnectionError, PeerError)):
            await conn.readexactly(1)
        await client.shutdown()
    asyncio.run(go())
