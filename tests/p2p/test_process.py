"""p2p/process.py: any command that prints multiaddrs, run as a child and stopped."""

from __future__ import annotations

import signal
import sys

from swarmlm.p2p.process import start_child

MADDR = "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWExample"
# prints a multiaddr once "reachable", then waits for a signal as a peer would
CHILD = f"import signal; print('starting'); print({MADDR!r}, flush=True); signal.pause()"


def test_child_of_any_command_reports_its_multiaddrs_and_stops_on_sigterm(tmp_path):
    child = start_child([sys.executable, "-c", CHILD], log_path=tmp_path / "child.log", timeout_s=60)
    try:
        assert child.maddrs == [MADDR] and child.peer_id == "12D3KooWExample"
        assert child.output[0] == "starting"
    finally:
        code = child.stop(timeout_s=30)
    assert code == -signal.SIGTERM
