"""Three `swarmlm node` processes on 127.0.0.1: get through the DHT, pin, lose a holder, re-replicate."""

import hashlib
import os
import time

import pytest

from tests.helpers.swarm import run_cli, start_nodes, stop_all

pytestmark = pytest.mark.slow

MIB = 1024 * 1024


def _sha(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(MIB), b""):
            h.update(piece)
    return h.hexdigest()


def test_get_pin_and_survive_the_first_holder_leaving(tmp_path):
    src = tmp_path / "big.bin"
    with open(src, "wb") as f:
        for _ in range(50):
            f.write(os.urandom(MIB))
    added = run_cli("store", "add", str(src), "--data-dir", str(tmp_path / "node0"))
    assert added.returncode == 0, added.stderr
    cid = added.stdout.decode().strip().splitlines()[-1]

    fast = ["--announce-interval", "2", "--replication-interval", "3"]
    nodes = start_nodes(3, tmp_path, args=fast)
    a, b, c = nodes
    try:
        out1 = tmp_path / "out1.bin"
        got = run_cli("store", "get", cid, "-o", str(out1), "--data-dir", str(tmp_path / "client1"),
                      "--initial-peers", c.maddrs[0])
        assert got.returncode == 0, got.stderr
        assert _sha(out1) == _sha(src)

        pinned = run_cli("store", "pin", cid, "--replicas", "2", "--initial-peers", c.maddrs[0])
        assert pinned.returncode == 0, pinned.stderr
        holders = pinned.stdout.decode().split()
        assert len(holders) == 2 and a.peer_id in holders

        assert a.stop() == 0
        out2 = tmp_path / "out2.bin"
        got = run_cli("store", "get", cid, "-o", str(out2), "--data-dir", str(tmp_path / "client2"),
                      "--initial-peers", c.maddrs[0])
        assert got.returncode == 0, got.stderr
        assert _sha(out2) == _sha(src)

        deadline = time.monotonic() + 90                  # the surviving holder restores two copies
        while time.monotonic() < deadline and not any("re-replicated" in n.log_text() for n in (b, c)):
            time.sleep(1)
        assert any("re-replicated" in n.log_text() for n in (b, c))
    finally:
        stop_all(nodes)


def test_get_of_an_unknown_cid_fails_cleanly_without_output(tmp_path):
    nodes = start_nodes(1, tmp_path)
    try:
        out = tmp_path / "out.bin"
        missing = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"
        got = run_cli("store", "get", missing, "-o", str(out), "--initial-peers", nodes[0].maddrs[0],
                      "--data-dir", str(tmp_path / "client"), timeout_s=120)
        assert got.returncode == 2
        assert "Traceback" not in got.stderr
        assert f"swarmlm store get: error: cannot get {missing}: nobody in the swarm provides it" in got.stderr
        assert not out.exists()
    finally:
        stop_all(nodes)


def test_get_with_a_malformed_cid_is_a_user_error(tmp_path):
    got = run_cli("store", "get", "not-a-cid", "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/"
                  "12D3KooWL8FbVjKbKAo8SzKQSMRucU8qeJCXsJnWrWhw3K3SAFHg", "--data-dir", str(tmp_path / "c"))
    assert got.returncode == 2
    assert "Traceback" not in got.stderr


def test_a_provider_killed_mid_transfer_over_the_side_channel_is_replaced_without_refetching(tmp_path):
    from swarmlm.p2p.peer import Peer
    from swarmlm.store import dag
    from swarmlm.store.fetch import FetchOptions, fetch_dag
    from tests.helpers.swarm import LoopThread

    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(24 * MIB))
    for name in ("node0", "node1"):
        added = run_cli("store", "add", str(src), "--data-dir", str(tmp_path / name))
        assert added.returncode == 0, added.stderr
    cid = dag.parse_cid(added.stdout.decode().strip().splitlines()[-1])
    nodes = start_nodes(2, tmp_path)
    a, b = nodes
    loop = LoopThread()
    try:
        client = loop.run(Peer.create(initial_peers=[b.maddrs[0]], client_mode=True), timeout_s=120)
        store = dag.open_store(tmp_path / "client")
        seen = []

        def on_block(n_bytes):
            seen.append(n_bytes)
            if len(seen) == 20:
                a.kill()                                   # SIGKILL, mid-transfer
        stats = loop.run(fetch_dag(client, cid, store, providers=[a.peer_id, b.peer_id], on_block=on_block,
                                   options=FetchOptions(batch=8, streams_per_provider=2, timeout_s=10)))
        total = len(list(dag.list_blocks(store, cid)))
        assert stats.fetched_blocks == total                 # each block fetched (and counted) once
        assert stats.side_channel_blocks == total            # all of them over the side channels
        assert stats.blocks_by_peer.get(b.peer_id, 0) > 0 and stats.blocks_by_peer.get(a.peer_id, 0) > 0
        assert b"".join(dag.iter_file(store, cid)) == src.read_bytes()
        loop.run(client.shutdown())
    finally:
        loop.close()
        stop_all(nodes)
