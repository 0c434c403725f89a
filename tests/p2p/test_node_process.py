"""`swarmlm node` as a process: prints reachable multiaddrs, and leaves no p2pd behind when stopped."""

import signal
import time

import pytest

from swarmlm.store import dag
from tests.helpers.swarm import NodeProcess, p2pd_children, pid_alive

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_node_prints_maddrs_then_a_ready_line_and_stops_cleanly_on_signal(tmp_path, sig):
    src = tmp_path / "hello.txt"
    src.write_bytes(b"hello\n")
    store = dag.open_store(tmp_path / "n")
    dag.pin(store, dag.add_file(store, src))
    node = NodeProcess(tmp_path / "n")
    try:
        maddrs = node.wait_ready()
        assert maddrs[0].startswith("/ip4/127.0.0.1/tcp/") and "/p2p/12D3KooW" in maddrs[0]
        daemons = p2pd_children(node.proc.pid)
        assert len(daemons) == 1
        node.proc.send_signal(sig)
        assert node.wait_exit(30) == 0                    # and its whole output read
    finally:
        node.kill()
    assert node.output[:len(maddrs)] == maddrs           # multiaddrs first, one a line (scripts take them)
    assert node.output[len(maddrs)] == (f"ready: storing 1 block (1 pinned root) in {tmp_path / 'n' / 'blocks'}; "
                                        f"serving them to the swarm")
    deadline = time.monotonic() + 10
    while any(pid_alive(p) for p in daemons) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(pid_alive(p) for p in daemons)

