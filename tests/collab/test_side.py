"""Parts over the side channel (real TCP on 127.0.0.1 between MemoryPeers): encrypted on the
wire, refused to non-members and unknown rounds, and a broken connection's parts go over libp2p."""

import asyncio

import pytest
import torch

from swarmlm.collab import side as side_transport
from swarmlm.collab.allreduce import AllReduce
from swarmlm.collab.matchmaking import Group
from swarmlm.collab.side import HEADER, SideTransport
from swarmlm.collab.streams import StreamTransport
from swarmlm.p2p.channel.conn import Connection
from swarmlm.p2p.memory import MemoryNetwork, MemoryPeer


async def _peers(n, transports=None, *, compression="none", max_part_elems=256, wait_for_round_s=30.0):
    """n MemoryPeers with reducers, and a list of (owner, sender) of every part that came over libp2p."""
    net = MemoryNetwork()
    peers = [await MemoryPeer.create(net) for _ in range(n)]
    reducers = [await AllReduce.create(p, max_part_elems=max_part_elems, transport=t, compression=compression,
                                       wait_for_round_s=wait_for_round_s)
                for p, t in zip(peers, transports or ["auto"] * n)]
    libp2p_parts = []
    for r, p in zip(reducers, peers):
        streams = next(t for t in r.transports if isinstance(t, StreamTransport))
        served = streams.rpc_part

        async def counted(peer_id, request, served=served, owner=p.peer_id):
            libp2p_parts.append((owner, peer_id))
            return await served(peer_id, request)
        streams.rpc_part = counted
    return net, peers, reducers, libp2p_parts


def _group(peers, gid=b"g" * 16):
    members = tuple(sorted(p.peer_id for p in peers))
    return Group(gid, 0, members, members[0])


async def _round(reducers, group, vecs, timeout_s=10):
    return await asyncio.gather(*(r.run(group, v, weight=1.0, timeout_s=timeout_s) for r, v in zip(reducers, vecs)),
                                return_exceptions=True)


def _assert_mean(vecs, results, atol=1e-6):
    for res in results:
        assert not isinstance(res, BaseException), res
        assert torch.equal(res.vector, results[0].vector)
        assert torch.allclose(res.vector, torch.stack(vecs).mean(0), atol=atol)


@pytest.mark.parametrize("codec", ["none", "int8"])
def test_the_side_channel_carries_every_part_and_averages_exactly(codec):
    async def main():
        _, peers, reducers, libp2p_parts = await _peers(3, compression=codec)
        vecs = [torch.randn(3000) for _ in peers]
        return vecs, await _round(reducers, _group(peers), vecs), libp2p_parts
    vecs, results, libp2p_parts = asyncio.run(main())
    assert libp2p_parts == []
    _assert_mean(vecs, results, atol={"none": 1e-6, "int8": 0.1}[codec])
    value_bytes = {"none": 4, "int8": 1}[codec]
    assert all(res.bytes_sent > 3000 * value_bytes * 2 / 3 for res in results)     # counted, as on the wire


def test_the_averaged_parts_on_the_wire_are_not_readable(monkeypatch):
    """Every byte either side writes to a side-channel socket is captured: no 16-byte run of any
    member's input or of the result appears in it, though the parts crossed it."""
    wire = []
    real_write_raw = Connection.write_raw

    def capture(self, data):
        wire.append(bytes(data))
        real_write_raw(self, data)
    monkeypatch.setattr(Connection, "write_raw", capture)

    async def main():
        _, peers, reducers, libp2p_parts = await _peers(2)
        vecs = [torch.randn(2000) for _ in peers]
        return vecs, await _round(reducers, _group(peers), vecs), libp2p_parts
    vecs, results, libp2p_parts = asyncio.run(main())
    _assert_mean(vecs, results)
    assert libp2p_parts == []
    sent = b"".join(wire)
    assert len(sent) > 2000 * 4                       # each member sent half its vector, got half back
    for t in [*vecs, results[0].vector]:
        plain = t.numpy().tobytes()
        for start in range(0, len(plain) - 16, 400):
            assert plain[start:start + 16] not in sent


async def _refused(stranger, owner, group_id):
    """Open a parts connection from `stranger` to `owner` naming `group_id`: the owner's answer
    (header kind and count, message), after which the connection ends."""
    conn = await (await stranger.side_channel()).open(owner.peer_id, side_transport.PURPOSE, timeout_s=5,
                                                      max_record_bytes=1 << 20)
    conn.write(group_id)
    header = bytearray(HEADER.size)
    await asyncio.wait_for(conn.read_record_into(header), 5)
    kind, _, count, _, _ = HEADER.unpack(header)
    message = await asyncio.wait_for(conn.read_record(), 5)
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
        await asyncio.wait_for(conn.read_record(), 5)
    conn.close()
    return kind, count, message.decode()


def test_a_non_member_or_an_unknown_round_is_refused_and_the_listener_keeps_serving():
    async def main():
        net, peers, reducers, libp2p_parts = await _peers(2, wait_for_round_s=1.0)
        stranger = await MemoryPeer.create(net)
        group = _group(peers)
        (owner, first), (member, second) = sorted(zip(peers, reducers), key=lambda pr: pr[0].peer_id)
        vecs = [torch.randn(2000) for _ in peers]
        run_owner = asyncio.ensure_future(first.run(group, vecs[peers.index(owner)], weight=1.0, timeout_s=10))
        answers = [await _refused(stranger, owner, group.group_id)]  # the round runs at the owner alone
        run_member = asyncio.ensure_future(second.run(group, vecs[peers.index(member)], weight=1.0, timeout_s=10))
        results = await asyncio.gather(run_owner, run_member)
        answers.append(await _refused(member, owner, b"u" * 16))  # a round that never starts there
        answers.append(await _refused(member, owner, group.group_id))   # ... or is over
        again = await _round(reducers, _group(peers, gid=b"h" * 16), vecs)
        return vecs, answers, list(results) + again, libp2p_parts, stranger.peer_id
    vecs, answers, results, libp2p_parts, stranger = asyncio.run(main())
    assert [(kind, count) for kind, count, _ in answers] == [(side_transport.ERROR, side_transport.FATAL)] * 3
    assert f"{stranger} is not a member" in answers[0][2]
    assert "never started" in answers[1][2] and "is over" in answers[2][2]
    _assert_mean(vecs, results)
    assert libp2p_parts == [] and not any(res.dropped for res in results)


def _fallback_round(monkeypatch, break_it):
    """One round of two members where `break_it(conn, data)` runs on every side-channel write of
    a record bigger than a header: (vectors, results, parts that came over libp2p)."""
    real_write_raw = Connection.write_raw

    def write_raw(self, data):
        data = break_it(self, data) if self.purpose == side_transport.PURPOSE and len(data) > 64 else data
        if data is not None:
            real_write_raw(self, data)
    monkeypatch.setattr(Connection, "write_raw", write_raw)

    async def main():
        _, peers, reducers, libp2p_parts = await _peers(2)
        vecs = [torch.randn(4000) for _ in peers]
        return vecs, await _round(reducers, _group(peers), vecs), libp2p_parts
    return asyncio.run(main())


def test_a_tampered_record_ends_the_connection_and_its_parts_are_redone_over_libp2p(monkeypatch):
    tampered = []

    def flip_one_byte(conn, data):
        if tampered:
            return data
        tampered.append(len(data))
        altered = bytearray(data)
        altered[len(altered) // 2] ^= 1
        return altered
    vecs, results, libp2p_parts = _fallback_round(monkeypatch, flip_one_byte)
    assert tampered and libp2p_parts
    _assert_mean(vecs, results)
    assert not any(res.dropped for res in results)        # the altered part was never aggregated


def test_a_connection_cut_mid_round_falls_back_to_libp2p_with_the_right_values(monkeypatch):
    cut = []

    def cut_after_first_part(conn, data):
        if cut:
            return data
        cut.append(conn)
        conn._transport.write(data)                       # the first part leaves, then the line goes dead
        conn.abort()
        return None
    vecs, results, libp2p_parts = _fallback_round(monkeypatch, cut_after_first_part)
    assert cut and libp2p_parts
    _assert_mean(vecs, results)


def test_a_libp2p_only_member_gets_and_sends_everything_over_libp2p():
    async def main():
        _, peers, reducers, libp2p_parts = await _peers(3, transports=["auto", "libp2p", "auto"])
        vecs = [torch.randn(3000) for _ in peers]
        return vecs, await _round(reducers, _group(peers), vecs), libp2p_parts, peers[1].peer_id
    vecs, results, libp2p_parts, private = asyncio.run(main())
    _assert_mean(vecs, results)
    # every part between the libp2p-only member and the others went over libp2p, and only those
    others = [m for m in results[0].group.members if m != private]
    assert set(libp2p_parts) == {(private, o) for o in others} | {(o, private) for o in others}


def test_a_closed_transport_opens_and_serves_nothing():
    async def main():
        _, peers, reducers, libp2p_parts = await _peers(2)
        side = next(t for t in reducers[1].transports if isinstance(t, SideTransport))
        await side.close()
        vecs = [torch.randn(2000) for _ in peers]
        return vecs, await _round(reducers, _group(peers), vecs), libp2p_parts
    vecs, results, libp2p_parts = asyncio.run(main())
    _assert_mean(vecs, results)
    assert len(set(libp2p_parts)) == 2                    # both directions went over libp2p
