"""`swarmlm node` as a process: prints reachable multiaddrs, listens only on its --host, and leaves
no p2pd behind when stopped."""

import contextlib
import os
import signal
import socket
from pathlib import Path

import pytest

from swarmlm.store import dag
from tests.helpers.swarm import NodeProcess, p2pd_children, wait_until_dead

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
    assert wait_until_dead(daemons, 10) == []



def _descendants(pid: int) -> list[int]:
    """`pid` and every process below it, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text() if entry.name.isdigit() else ""
        except OSError:
            continue
        if stat:
            children.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        out.append(todo.pop())
        todo.extend(children.get(out[-1], []))
    return out


def _ip(hex_addr: str) -> str:
    """An address as /proc/net/{tcp,udp}[6] prints it (32-bit words in host byte order)."""
    raw = bytes.fromhex(hex_addr)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, words)


def _listening(pids: list[int]) -> list[tuple[str, str, int]]:
    """(protocol, IP, port) of every TCP socket listening and every UDP socket open to any sender
    that these processes hold."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    inodes.add(link[len("socket:["):-1])
    found = []
    for proto, state in (("tcp", "0A"), ("tcp6", "0A"), ("udp", "07"), ("udp6", "07")):   # LISTEN; unconnected
        for line in Path(f"/proc/{pids[0]}/net/{proto}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes and fields[3] == state:
                host, port = fields[1].split(":")
                found.append((proto, _ip(host), int(port, 16)))
    return found


def test_node_with_host_listens_on_that_host_only(tmp_path):
    """`swarmlm node --host 127.0.0.1`: its libp2p daemon and its side channel (with the block
    exchange on it) listen on 127.0.0.1, and nothing of it on every interface."""
    node = NodeProcess(tmp_path / "n")           # started with --host 127.0.0.1
    try:
        node.wait_ready()
        pids = _descendants(node.proc.pid)
        assert len(pids) >= 2                        # the node and its p2pd
        found = _listening(pids)
        tcp = [f for f in found if f[0].startswith("tcp")]
        assert len(tcp) >= 2, found                  # p2pd's listener and the side channel's
        assert all(ip == "127.0.0.1" for _, ip, _ in found), found
    finally:
        node.stop()
