"""Every listener a peer process opens (libp2p's p2pd and the side channel) is bound to its --host.

`swarmlm node`, `serve` and `train --swarm` are started on 127.0.0.1; the TCP sockets they and
their p2pd children listen on are read from /proc, and each must be 127.0.0.1 (never 0.0.0.0
or ::). A side channel is counted: each process listens on exactly two TCP ports, p2pd's and
the side channel's."""

from pathlib import Path

import pytest

from tests.helpers.collab import TrainPeer
from tests.helpers.sockets import listening
from tests.helpers.swarm import NodeProcess, poll_until
from tests.helpers.swarm_servers import build_checkpoint

pytestmark = pytest.mark.slow


def _wait_listening(pid: int, n: int, timeout_s: float = 120.0) -> list[tuple[str, int]]:
    """The process's listeners, once it has `n` of them (the side channel starts with its first purpose)."""
    poll_until(lambda: len(listening(pid)) >= n, timeout_s)
    return listening(pid)


def _assert_bound_to_loopback(found):
    assert len(found) == 2, found                               # p2pd and the side channel
    assert all(ip == "127.0.0.1" for ip, _ in found), found


def test_node_serve_and_train_listen_only_on_their_host(tmp_path):
    from swarmlm.swarm.server.serve import start_server_process
    node = NodeProcess(tmp_path / "node")
    procs = [node]
    try:
        maddr = node.wait_ready()[0]
        _assert_bound_to_loopback(_wait_listening(node.proc.pid, 2))
        ckpt = build_checkpoint(tmp_path / "ckpt")
        server = start_server_process(str(ckpt), blocks=(0, 2), initial_peers=[maddr], data_dir=tmp_path / "serve")
        procs.append(server)
        _assert_bound_to_loopback(_wait_listening(server.proc.pid, 2))
        data = Path(tmp_path / "data.txt")
        data.write_text("def f(x):\n    return x + 1\n" * 2000)
        trainer = TrainPeer(tmp_path / "train", ["--run-id", "listen", "--steps", "100000", "--data", str(data),
                                                 "--batch-size", "2", "--seq-len", "16", "--initial-peers", maddr])
        procs.append(trainer)
        trainer.wait_maddr()
        _assert_bound_to_loopback(_wait_listening(trainer.proc.pid, 2))
    finally:
        for p in procs:
            p.kill()
