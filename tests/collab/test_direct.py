"""The direct TCP path of a round: authenticated frames, refusals, fallback to libp2p, dying members."""

import asyncio
import socket

import pytest
import torch

from swarmlm.collab import allreduce, direct
from swarmlm.collab.allreduce import AllReduce
from swarmlm.collab.matchmaking import Group
from swarmlm.errors import IntegrityError, RoundFailed
from swarmlm.p2p.memory import MemoryNetwork, MemoryPeer


async def _peers(n, transports=None, **kw):
    net = MemoryNetwork()
    peers = [await MemoryPeer.create(net) for _ in range(n)]
    transports = transports or ["auto"] * n
    reducers = [await AllReduce.create(p, max_part_elems=kw.get("max_part_elems", 256), transport=t,
                                       compression=kw.get("compression", "none"))
                for p, t in zip(peers, transports)]
    libp2p_parts = []                     # (owner, sender) of every part that came over libp2p
    for r, p in zip(reducers, peers):
        served = r.rpc_part

        async def counted(peer_id, request, served=served, owner=p.peer_id):
            libp2p_parts.append((owner, peer_id))
            return await served(peer_id, request)
        r.rpc_part = counted
    return net, peers, reducers, libp2p_parts


def _group(peers, gid=b"g" * 16):
    members = tuple(sorted(p.peer_id for p in peers))
    return Group(gid, 0, members, members[0])


async def _round(reducers, group, vecs, timeout_s=10):
    return await asyncio.gather(*(r.run(group, v, weight=1.0, timeout_s=timeout_s) for r, v in zip(reducers, vecs)),
                                return_exceptions=True)


def _channel_pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    key = direct.new_key()
    return direct.Channel(a, key, opener=True), direct.Channel(b, key, opener=False)


def test_frames_round_trip_and_a_replayed_frame_fails_its_tag():
    async def main():
        opener, server = _channel_pair()
        await opener.send(direct.PART, part=3, weight=2.0, payload=b"x" * 100)
        frame, payload = await server.recv(lambda kind, part: 100)
        # replay the same bytes: the sequence number is already used
        header = direct._HEADER.pack(direct._MAGIC, direct.PART, 0, 0, 3, 0, 2.0, 100)
        tag = direct._tag(opener.key, 0, 0, header, b"x" * 100)
        opener.sock.send(header + b"x" * 100 + tag)
        with pytest.raises(IntegrityError):
            await server.recv(lambda kind, part: 100)
        return frame, bytes(payload)
    frame, payload = asyncio.run(main())
    assert (frame.kind, frame.part, frame.weight, payload) == (direct.PART, 3, 2.0, b"x" * 100)


def test_an_oversized_frame_is_refused_before_its_payload_is_read():
    async def main():
        opener, server = _channel_pair()
        await opener.send(direct.PART, part=0, payload=b"x" * 1000)
        await server.recv(lambda kind, part: 10)
    with pytest.raises(Exception, match="at most 10"):
        asyncio.run(main())


@pytest.mark.parametrize("codec", ["none", "int8"])
def test_direct_path_carries_every_part_and_averages_exactly(codec):
    async def main():
        _, peers, reducers, libp2p_parts = await _peers(3, compression=codec)
        vecs = [torch.randn(3000) for _ in peers]
        return vecs, await _round(reducers, _group(peers), vecs), libp2p_parts
    vecs, results, libp2p_parts = asyncio.run(main())
    assert libp2p_parts == []
    tol = {"none": 1e-6, "int8": 0.1}[codec]
    for res in results:
        assert torch.equal(res.vector, results[0].vector)
        assert torch.allclose(res.vector, torch.stack(vecs).mean(0), atol=tol)


def test_a_libp2p_only_member_gets_and_sends_everything_over_libp2p():
    async def main():
        _, peers, reducers, libp2p_parts = await _peers(3, transports=["auto", "libp2p", "auto"])
        vecs = [torch.randn(3000) for _ in peers]
        return vecs, await _round(reducers, _group(peers), vecs), libp2p_parts, peers[1].peer_id
    vecs, results, libp2p_parts, private = asyncio.run(main())
    for res in results:
        assert torch.allclose(res.vector, torch.stack(vecs).mean(0), atol=1e-6)
    # every part between the libp2p-only member and the others went over libp2p, and only those
    others = [m for m in results[0].group.members if m != private]
    assert set(libp2p_parts) == {(private, o) for o in others} | {(o, private) for o in others}


def _two_peer_round():
    """One averaging round of two peers' random vectors: (vectors, results, parts sent over libp2p)."""
    async def main():
        _, peers, reducers, libp2p_parts = await _peers(2)
        vecs = [torch.randn(2000) for _ in peers]
        return vecs, await _round(reducers, _group(peers), vecs), libp2p_parts
    return asyncio.run(main())


def _assert_mean(vecs, results):
    for res in results:
        assert not isinstance(res, BaseException), res
        assert torch.allclose(res.vector, torch.stack(vecs).mean(0), atol=1e-6)


def test_a_connection_with_a_wrong_key_is_refused_and_the_round_completes_over_libp2p(monkeypatch):
    real_connect = direct.connect

    async def connect_with_wrong_key(answer, key, group_id, peer_id, *, timeout_s):
        return await real_connect(answer, direct.new_key(), group_id, peer_id, timeout_s=timeout_s)
    monkeypatch.setattr(allreduce.direct, "connect", connect_with_wrong_key)

    vecs, results, libp2p_parts = _two_peer_round()
    _assert_mean(vecs, results)
    assert libp2p_parts                       # the refused pairs fell back


def test_a_forged_frame_is_answered_with_an_error_and_never_aggregated(monkeypatch):
    """The first part frame arrives altered after its tag was made: the owner refuses it, says
    so, and the part is redone over libp2p; the result is the honest mean."""
    real_send = direct.Channel.send
    forged = []

    async def send_altered_once(self, kind, *, part=0, count=0, weight=0.0, payload=b""):
        if kind != direct.PART or forged:
            return await real_send(self, kind, part=part, count=count, weight=weight, payload=payload)
        forged.append(part)
        header = direct._HEADER.pack(direct._MAGIC, kind, self._out_dir, self._out_seq, part, count, weight,
                                     len(payload))
        tag = direct._tag(self.key, self._out_dir, self._out_seq, header, payload)
        self._out_seq += 1
        altered = bytearray(payload)
        altered[:4] = b"\x00\x00\x80\x7f"     # +inf
        await asyncio.get_running_loop().sock_sendall(self.sock, header + bytes(altered) + tag)
    monkeypatch.setattr(direct.Channel, "send", send_altered_once)

    vecs, results, libp2p_parts = _two_peer_round()
    assert forged and libp2p_parts
    _assert_mean(vecs, results)
    assert not any(res.dropped for res in results)


def test_junk_on_the_listener_is_dropped_and_the_listener_keeps_serving():
    async def main():
        _, peers, reducers, libp2p_parts = await _peers(2)
        listener = reducers[0].direct
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(b"GET / HTTP/1.1\r\n\r\n" + b"\xff" * 64)
        await writer.drain()
        try:
            answer = await asyncio.wait_for(reader.read(), 5)
        except ConnectionResetError:          # closed with our junk unread
            answer = b""
        writer.close()
        vecs = [torch.randn(2000) for _ in peers]
        return answer, vecs, await _round(reducers, _group(peers), vecs), libp2p_parts
    answer, vecs, results, libp2p_parts = asyncio.run(main())
    assert answer == b""                      # closed unanswered: nothing authenticates it
    assert libp2p_parts == []
    assert torch.allclose(results[0].vector, torch.stack(vecs).mean(0), atol=1e-6)


def test_member_killed_mid_transfer_on_the_direct_path_fails_the_round_for_the_others():
    """C dies (libp2p gone, its sockets closed) with parts in flight: A and B raise RoundFailed
    naming it, their inputs untouched, and a retry over the two of them gives their exact mean."""
    async def main():
        net, peers, reducers, _ = await _peers(3, max_part_elems=1 << 12)
        group = _group(peers)
        by_id = {p.peer_id: r for p, r in zip(peers, reducers)}
        victim = group.members[1]
        survivors = [m for m in group.members if m != victim]
        vecs = {m: torch.randn(1 << 17) for m in group.members}
        originals = {m: v.clone() for m, v in vecs.items()}

        async def reply_never(*args):         # the victim holds its answers until it dies
            await asyncio.Event().wait()
        by_id[victim]._reply_direct = reply_never
        runs = {m: asyncio.ensure_future(by_id[m].run(group, vecs[m], weight=1.0, timeout_s=5))
                for m in group.members}
        for _ in range(100000):               # until a first part of the victim's has arrived somewhere
            if any(victim in own.contribs for m in survivors for rnd in by_id[m]._rounds.values()
                   for own in rnd.owned.values()):
                break
            await asyncio.sleep(0)
        assert not any(t.done() for t in runs.values())
        net.kill(victim)
        runs[victim].cancel()
        await by_id[victim].close()
        first = await asyncio.gather(*(runs[m] for m in survivors), return_exceptions=True)
        retry = Group(b"r" * 16, 0, tuple(survivors), survivors[0])
        second = await asyncio.gather(*(by_id[m].run(retry, vecs[m], weight=1.0, timeout_s=5) for m in survivors))
        return first, second, vecs, originals, survivors, victim
    first, second, vecs, originals, survivors, victim = asyncio.run(main())
    for res in first:
        assert isinstance(res, RoundFailed), res
    assert any(victim in res.suspects for res in first)
    for m in survivors:
        assert torch.equal(vecs[m], originals[m])
    expected = (vecs[survivors[0]] + vecs[survivors[1]]) / 2
    for res in second:
        assert torch.allclose(res.vector, expected, atol=1e-6)
