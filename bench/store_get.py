"""`store get` between two peers on loopback, against a bare libp2p stream, and what encryption costs it.

    python bench/store_get.py [--mib 64] [--repeats 5]

Peer A (a subprocess, as a node would be) adds a random file to its block store and serves
it (exchange.BlockService); peer B (this process), with an empty store each time, fetches
the whole DAG and verifies and stores every block (what `swarmlm store get` does, minus
writing the output file):
- as it does by default: over A's side channel (p2p/channel: AES-256-GCM records);
- over the same side channel with the cipher swapped for a copy (`NullCipher`, both ends,
  this bench only): the same connections, framing and records in the clear, so the
  difference is what encryption costs the transfer;
- over libp2p streams only.
Beside them, in the same run and between the same two peers: the same number of bytes sent by
A over one bare libp2p stream (p2pd on both ends), and a plain TCP socket copy on 127.0.0.1.
Every side runs once per round, rounds interleaved (the order alternating), so load changes on
a shared machine hit every side alike. Prints one JSON line per result (medians over rounds),
then the ratios get / bare stream (target >= 0.8) and encrypted / plain side channel (a plain
mode for content-addressed blocks is worth having only below 0.85).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from swarmlm.p2p.channel import service  # noqa: E402
from swarmlm.store import dag, fetch  # noqa: E402
from swarmlm.store.exchange import BlockService  # noqa: E402
from swarmlm.store.fetch import FetchOptions, fetch_dag  # noqa: E402

CHUNK = 256 * 1024
RAW = "bench/raw-stream/1"
PLAIN = "bench/store-blocks-plain"      # a side-channel purpose whose records are not encrypted
TAG = bytes(16)


class NullCipher:
    """AES-GCM's interface with no cipher: the plaintext, copied, and 16 zero bytes for a tag."""

    def encrypt(self, nonce, data, aad):
        return bytes(data) + TAG

    def encrypt_into(self, nonce, data, aad, out):
        out[:len(data)] = data
        out[len(data):] = TAG

    def decrypt(self, nonce, data, aad):
        return bytes(memoryview(data)[:-len(TAG)])

    def decrypt_into(self, nonce, data, aad, out):
        out[:] = memoryview(data)[:-len(TAG)]


def allow_plain_purpose() -> None:
    """Connections opened for PLAIN, in this process, skip the cipher (both ends call this)."""
    real = service.direction_keys

    def keys(key, *, dialer, listener, purpose):
        return (NullCipher(), NullCipher()) if purpose == PLAIN else real(key, dialer=dialer, listener=listener,
                                                                          purpose=purpose)
    service.direction_keys = keys


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (peer A's process, the p2pd daemons), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text() if entry.name.isdigit() else ""
            if stat:
                children.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), []).append(int(entry.name))
        except (OSError, ValueError):
            pass
    out, todo = [], [pid]
    while todo:
        out.append(todo.pop())
        todo.extend(children.get(out[-1], []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes (all their threads) so far."""
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def emit(name: str, value: float, unit: str, **extra) -> None:
    print(json.dumps({"name": name, "value": round(value, 4), "unit": unit, **extra}), flush=True)


async def send_bytes(writer, n_bytes: int) -> None:
    """Write n_bytes (one random 256 KiB piece over and over), then close."""
    payload = os.urandom(CHUNK)
    sent = 0
    while sent < n_bytes:
        piece = payload[:min(CHUNK, n_bytes - sent)]
        writer.write(piece)
        await writer.drain()
        sent += len(piece)
    writer.close()


async def receive_bytes(reader, writer, n_bytes: int, what: str) -> float:
    """Read until n_bytes have come; bytes per second."""
    start = time.perf_counter()
    got = 0
    while got < n_bytes:
        piece = await reader.read(1 << 20)
        if not piece:
            break
        got += len(piece)
    elapsed = time.perf_counter() - start
    writer.close()
    assert got == n_bytes, f"{what} moved {got} of {n_bytes} bytes"
    return n_bytes / elapsed


async def serve_raw(n_bytes: int):
    async def handler(peer_id, reader, writer):
        await send_bytes(writer, n_bytes)
    return handler


async def bare_stream(peer_a: str, b, n_bytes: int) -> float:
    reader, writer = await b.open_raw_stream(peer_a, RAW)
    return await receive_bytes(reader, writer, n_bytes, "bare stream")


async def tcp_copy(n_bytes: int) -> float:
    server = await asyncio.start_server(lambda reader, writer: send_bytes(writer, n_bytes), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        return await receive_bytes(reader, writer, n_bytes, "tcp copy")
    finally:
        server.close()


async def serve(work: Path, mib: int) -> None:
    """Peer A: add the file, serve its blocks and a raw stream, print maddr and root, run until stdin closes."""
    from swarmlm.p2p.peer import Peer

    src = work / "file.bin"
    with open(src, "wb") as f:
        for _ in range(mib * 4):
            f.write(os.urandom(CHUNK))
    store = dag.open_store(work / "a")
    root = dag.add_file(store, src)
    allow_plain_purpose()
    async with await Peer.create() as a:
        blocks = BlockService(a, store)
        await blocks.start()
        await (await a.side_channel()).serve(PLAIN, blocks._serve_side, max_record_bytes=1 << 20)
        await a.add_raw_stream_handler(RAW, await serve_raw(mib * 1024 * 1024))
        print(a.maddrs[0], root, flush=True)
        await asyncio.to_thread(sys.stdin.read)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--serve", default=None, help=argparse.SUPPRESS)   # internal: run as peer A
    args = parser.parse_args()
    if args.serve:
        return await serve(Path(args.serve), args.mib)
    from swarmlm.p2p.peer import Peer

    n_bytes = args.mib * 1024 * 1024
    work = Path(tempfile.mkdtemp(prefix="swarmlm-bench-get-"))
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(work), "--mib", str(args.mib)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        maddr, root = server.stdout.readline().decode().split()
        root = dag.parse_cid(root)
        peer_a = maddr.rsplit("/p2p/", 1)[1]
        b = await Peer.create(initial_peers=[maddr], client_mode=True)
        allow_plain_purpose()

        async def get(side_channel: bool, purpose: str = fetch.PURPOSE) -> float:
            store_b = dag.open_store(work / "b")
            fetch.PURPOSE = purpose
            try:
                start = time.perf_counter()
                stats = await fetch_dag(b, root, store_b, providers=[peer_a],
                                        options=FetchOptions(side_channel=side_channel))
                assert stats.fetched_bytes >= n_bytes and not stats.banned
                return stats.fetched_bytes / (time.perf_counter() - start)
            finally:
                fetch.PURPOSE = service_purpose
                shutil.rmtree(work / "b", ignore_errors=True)

        service_purpose = fetch.PURPOSE
        sides = {"get": lambda: get(True), "plain": lambda: get(True, PLAIN), "libp2p": lambda: get(False),
                 "bare": lambda: bare_stream(peer_a, b, n_bytes), "tcp": lambda: tcp_copy(n_bytes)}
        rates: dict[str, list[float]] = {k: [] for k in sides}
        cpu: dict[str, list[float]] = {k: [] for k in sides}     # CPU seconds per GiB, both peers and their p2pd
        pids = process_tree(os.getpid())         # B, its p2pd, A (a child of B) and A's p2pd
        try:
            await get(True)                          # warm-up: side channels, DHT look-ups, page cache
            for i in range(args.repeats):
                for k in (list(sides) if i % 2 == 0 else list(reversed(sides))):
                    before = cpu_seconds(pids)
                    rates[k].append(await sides[k]())
                    cpu[k].append((cpu_seconds(pids) - before) / (n_bytes / 2**30))
        finally:
            await b.shutdown()
        rate = {k: statistics.median(v) for k, v in rates.items()}
        cpu_per_gib = {k: round(statistics.median(v), 3) for k, v in cpu.items()}
        emit("store_get_throughput", rate["get"] / 1e9, "GB/s", mib=args.mib, path="side channel, AES-256-GCM",
             cpu_s_per_gib=cpu_per_gib["get"])
        emit("store_get_plain_side_channel_throughput", rate["plain"] / 1e9, "GB/s", mib=args.mib,
             path="side channel, records in the clear", cpu_s_per_gib=cpu_per_gib["plain"])
        emit("store_get_libp2p_only_throughput", rate["libp2p"] / 1e9, "GB/s", mib=args.mib,
             cpu_s_per_gib=cpu_per_gib["libp2p"])
        emit("bare_libp2p_stream_throughput", rate["bare"] / 1e9, "GB/s", mib=args.mib,
             cpu_s_per_gib=cpu_per_gib["bare"])
        emit("tcp_loopback_throughput", rate["tcp"] / 1e9, "GB/s", mib=args.mib, cpu_s_per_gib=cpu_per_gib["tcp"])

        def paired(a: str, b: str) -> float:       # the median of the rounds' own ratios: less hit by load swings
            return round(statistics.median(x / y for x, y in zip(rates[a], rates[b])), 4)
        emit("store_get_vs_bare_stream", rate["get"] / rate["bare"], "ratio", target=0.8,
             paired_median=paired("get", "bare"))
        emit("store_get_libp2p_only_vs_bare_stream", rate["libp2p"] / rate["bare"], "ratio",
             paired_median=paired("libp2p", "bare"))
        emit("store_get_encrypted_vs_plain_side_channel", rate["get"] / rate["plain"], "ratio",
             paired_median=paired("get", "plain"),
             cpu_plain_vs_encrypted=round(cpu_per_gib["plain"] / cpu_per_gib["get"], 4), plain_mode_worth_it_below=0.85)
    finally:
        server.stdin.close()
        server.wait(30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
