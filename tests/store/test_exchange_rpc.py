"""Every RPC a storage node serves, sent bad input over real libp2p and over its side channel: an
error each time, and the node keeps serving good requests."""

import asyncio

import pytest

from swarmlm import serialize
from swarmlm.errors import PeerError, RemoteError
from swarmlm.p2p import rpc
from swarmlm.store import dag
from swarmlm.store.exchange import (BLOCKS, HAS, MAX_BATCH, PURPOSE, REPLY_RECORD_BYTES, BlockRequest, HasReply,
                                    HasRequest)
from swarmlm.store.node import PIN, NodeOptions, PinRequest, StoreNode
from tests.helpers.swarm import LoopThread

pytestmark = pytest.mark.slow

UNKNOWN = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"   # a valid CID nobody holds
MALFORMED = "bafy-not-a-cid!"


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    from swarmlm.p2p.peer import Peer
    tmp = tmp_path_factory.mktemp("rpc")
    loop = LoopThread()
    store = dag.open_store(tmp / "server")
    root = dag.add_bytes(store, b"hello swarm" * 50_000)        # a few blocks
    dag.pin(store, root)

    async def up():
        server = await Peer.create()
        client = await Peer.create(initial_peers=server.maddrs, client_mode=True)
        service = StoreNode(server, store, NodeOptions(announce_interval_s=3600, replication_interval_s=3600))
        await service.start()
        return server, client, service
    server, client, service = loop.run(up(), timeout_s=180)
    yield loop, server, client, root
    loop.run(service.close())
    loop.run(client.shutdown())
    loop.run(server.shutdown())
    loop.close()


def _stream(loop, client, server, request: bytes) -> list[bytes]:
    async def go():
        return [c async for c in client.call_stream(server.peer_id, BLOCKS, request, timeout_s=20,
                                                    max_chunk_bytes=4 << 20)]
    return loop.run(go())


def _unary(loop, client, server, name: str, request: bytes) -> bytes:
    return loop.run(client.call(server.peer_id, name, request, timeout_s=60, max_response_bytes=1 << 20))


def _assert_still_serving(loop, client, server, root):
    chunks = _stream(loop, client, server, serialize.encode_message(BlockRequest(cids=[str(root)],
                                                                                  max_block_bytes=1 << 20)))
    assert len(chunks) == 1 and chunks[0][:1] == b"\x00" and dag.block_matches(root, chunks[0][1:])


def _good_blocks() -> dict:
    return {"cids": [UNKNOWN], "max_block_bytes": 1 << 20}


BAD_BLOCK_REQUESTS = {
    "oversized": b"\x80" * (65 * 1024),
    "truncated": serialize.encode_message(BlockRequest(cids=[UNKNOWN], max_block_bytes=1 << 20))[:-5],
    "not_a_map": serialize.pack([1, 2, 3]),
    "cids_wrong_type": serialize.pack({**_good_blocks(), "cids": UNKNOWN}),
    "cid_wrong_type": serialize.pack({**_good_blocks(), "cids": [42]}),
    "size_wrong_type": serialize.pack({**_good_blocks(), "max_block_bytes": "lots"}),
    "negative_size": serialize.pack({**_good_blocks(), "max_block_bytes": -1}),
    "zero_size": serialize.pack({**_good_blocks(), "max_block_bytes": 0}),
    "huge_size": serialize.pack({**_good_blocks(), "max_block_bytes": 1 << 40}),
    "malformed_cid": serialize.pack({**_good_blocks(), "cids": [MALFORMED]}),
    "no_cids": serialize.pack({**_good_blocks(), "cids": []}),
    "too_many_cids": serialize.pack({**_good_blocks(), "cids": [UNKNOWN] * (MAX_BATCH + 1)}),
    "unknown_field": serialize.pack({**_good_blocks(), "extra": 1}),
}


@pytest.mark.parametrize("case", sorted(BAD_BLOCK_REQUESTS))
def test_blocks_rpc_answers_bad_input_with_an_error(node, case):
    loop, server, client, root = node
    with pytest.raises(RemoteError):
        _stream(loop, client, server, BAD_BLOCK_REQUESTS[case])
    _assert_still_serving(loop, client, server, root)


def test_blocks_rpc_reports_an_unknown_cid_in_band(node):
    loop, server, client, root = node
    chunks = _stream(loop, client, server, serialize.encode_message(BlockRequest(cids=[UNKNOWN, str(root)],
                                                                                  max_block_bytes=1 << 20)))
    assert chunks[0][:1] == b"\x01" and b"not found" in chunks[0]
    assert chunks[1][:1] == b"\x00"


def test_blocks_rpc_survives_a_truncated_frame(node):
    loop, server, client, root = node

    async def go():
        reader, writer = await client.open_raw_stream(server.peer_id, BLOCKS)
        writer.write(b"\x00" + (100).to_bytes(4, "big") + b"only ten b")   # promises 100, sends 10
        await writer.drain()
        writer.close()
        await asyncio.sleep(0.2)
    loop.run(go())
    _assert_still_serving(loop, client, server, root)


BAD_HAS_REQUESTS = {
    "oversized": b"\x80" * (65 * 1024),
    "truncated": serialize.encode_message(HasRequest(cids=[UNKNOWN]))[:-5],
    "wrong_type": serialize.pack({"cids": 7}),
    "malformed_cid": serialize.pack({"cids": [MALFORMED]}),
    "too_many_cids": serialize.pack({"cids": [UNKNOWN] * (MAX_BATCH + 1)}),
}


@pytest.mark.parametrize("case", sorted(BAD_HAS_REQUESTS))
def test_has_rpc_answers_bad_input_with_an_error(node, case):
    loop, server, client, root = node
    with pytest.raises(RemoteError):
        _unary(loop, client, server, HAS, BAD_HAS_REQUESTS[case])
    _assert_still_serving(loop, client, server, root)


def test_has_rpc_says_which_blocks_it_holds(node):
    loop, server, client, root = node
    reply = _unary(loop, client, server, HAS, serialize.encode_message(HasRequest(cids=[str(root), UNKNOWN])))
    assert serialize.decode_message(reply, HasReply).have == [True, False]


def _pin(root=UNKNOWN, replicas=2, providers=()) -> dict:
    return {"root": root, "replicas": replicas, "providers": list(providers)}


BAD_PIN_REQUESTS = {
    "oversized": b"\x80" * (65 * 1024),
    "truncated": serialize.encode_message(PinRequest(root=UNKNOWN, replicas=2, providers=[]))[:-3],
    "replicas_negative": serialize.pack(_pin(replicas=-1)),
    "replicas_zero": serialize.pack(_pin(replicas=0)),
    "replicas_huge": serialize.pack(_pin(replicas=10**9)),
    "replicas_wrong_type": serialize.pack(_pin(replicas="two")),
    "root_wrong_type": serialize.pack(_pin(root=b"\x01\x55")),
    "malformed_root": serialize.pack(_pin(root=MALFORMED)),
    "providers_wrong_type": serialize.pack(_pin(providers="peer")),
    "too_many_providers": serialize.pack(_pin(providers=["p"] * 17)),
    "unknown_root": serialize.pack(_pin()),
}


@pytest.mark.parametrize("case", sorted(BAD_PIN_REQUESTS))
def test_pin_rpc_answers_bad_input_with_an_error(node, case):
    loop, server, client, root = node
    with pytest.raises(RemoteError):
        _unary(loop, client, server, PIN, BAD_PIN_REQUESTS[case])
    _assert_still_serving(loop, client, server, root)


# ---- the side channel: the same blocks requests, over an encrypted TCP connection ---------------

async def _side_requests(client, server, *requests: bytes) -> list:
    """Send `requests` one after another over one side-channel connection; per request its reply
    chunks, or the exception that ended it (the connection is not used after that)."""
    side = await client.side_channel()
    conn = await side.open(server.peer_id, PURPOSE, timeout_s=20, max_record_bytes=REPLY_RECORD_BYTES)
    out = []
    try:
        for request in requests:
            try:
                await rpc.write_frame(conn, rpc.REQUEST, request)
                out.append([c async for c in rpc.read_stream(conn, peer_id=server.peer_id, name="side", timeout_s=20,
                                                             max_chunk_bytes=4 << 20)])
            except PeerError as e:
                out.append(e)
                break
    finally:
        conn.close()
    return out


def _blocks(*cids) -> bytes:
    return serialize.encode_message(BlockRequest(cids=[str(c) for c in cids], max_block_bytes=1 << 20))


def test_side_channel_serves_the_same_blocks_one_request_after_another(node):
    loop, server, client, root = node
    first, second = loop.run(_side_requests(client, server, _blocks(root, UNKNOWN), _blocks(root)))
    assert first[0][:1] == b"\x00" and dag.block_matches(root, first[0][1:]) and first[1][:1] == b"\x01"
    assert len(second) == 1 and dag.block_matches(root, second[0][1:])


@pytest.mark.parametrize("case", ["oversized", "truncated", "malformed_cid", "too_many_cids", "negative_size"])
def test_side_channel_blocks_answer_bad_input_with_an_error(node, case):
    loop, server, client, root = node
    got, = loop.run(_side_requests(client, server, BAD_BLOCK_REQUESTS[case], _blocks(root)))
    assert isinstance(got, PeerError)             # an ERROR frame (RemoteError), or the connection cut
    (chunks,) = loop.run(_side_requests(client, server, _blocks(root)))
    assert dag.block_matches(root, chunks[0][1:])


def test_fetch_goes_over_the_side_channel_and_falls_back_to_libp2p_when_it_cannot_be_opened(node, tmp_path,
                                                                                           monkeypatch, caplog):
    import logging

    from swarmlm.p2p.channel.service import SideChannel
    from swarmlm.store.fetch import fetch_dag
    loop, server, client, root = node
    side = loop.run(server.side_channel())
    before = side.accepted
    store = dag.open_store(tmp_path / "a")
    loop.run(fetch_dag(client, root, store, providers=[server.peer_id]))
    assert side.accepted > before and dag.block_matches(root, store.get(root))

    async def unreachable(*args, **kwargs):
        raise PeerError("connection refused")
    monkeypatch.setattr(SideChannel, "open", unreachable)
    before = side.accepted
    store = dag.open_store(tmp_path / "b")
    with caplog.at_level(logging.INFO, logger="swarmlm"):
        stats = loop.run(fetch_dag(client, root, store, providers=[server.peer_id]))
    assert "using libp2p streams" in caplog.text and side.accepted == before
    assert stats.fetched_blocks == len(list(dag.list_blocks(store, root)))
    assert b"".join(dag.iter_file(store, root)) == b"hello swarm" * 50_000
