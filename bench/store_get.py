"""`store get` between two peers on loopback, against a bare libp2p stream and a plain TCP copy.

    python bench/store_get.py [--mib 64] [--repeats 3]

Peer A (a subprocess, as a node would be) adds a random file to its block store and serves
it (exchange.BlockService); peer B (this process), with an empty store each time, fetches
the whole DAG and verifies and stores every block (what `swarmlm store get` does, minus
writing the output file): once as it does by default (over A's direct TCP offer, see
p2p/direct.py) and once over libp2p streams only. Beside them, in the same run and between
the same two peers: the same number of bytes sent by A over one bare libp2p stream (p2pd on
both ends), and a plain TCP socket copy on 127.0.0.1. Prints one JSON line per result
(medians over repeats), then the ratios get / bare stream (target >= 0.8).
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

from swarmlm.store import dag  # noqa: E402
from swarmlm.store.exchange import BlockService, FetchOptions, fetch_dag  # noqa: E402

CHUNK = 256 * 1024
RAW = "bench/raw-stream/1"


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
    async with await Peer.create() as a:
        await BlockService(a, store).start()
        await a.add_raw_stream_handler(RAW, await serve_raw(mib * 1024 * 1024))
        print(a.maddrs[0], root, flush=True)
        await asyncio.to_thread(sys.stdin.read)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
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
        try:
            get_rates, libp2p_rates, raw_rates, tcp_rates = [], [], [], []
            for i in range(args.repeats):           # interleaved, so load changes hit every side alike
                raw_rates.append(await bare_stream(peer_a, b, n_bytes))
                for rates, direct in ((get_rates, True), (libp2p_rates, False)):
                    store_b = dag.open_store(work / f"b{i}")
                    start = time.perf_counter()
                    stats = await fetch_dag(b, root, store_b, providers=[peer_a], options=FetchOptions(direct=direct))
                    rates.append(stats.fetched_bytes / (time.perf_counter() - start))
                    shutil.rmtree(work / f"b{i}", ignore_errors=True)
                tcp_rates.append(await tcp_copy(n_bytes))
        finally:
            await b.shutdown()
        get_rate, libp2p_rate, raw_rate, tcp_rate = map(statistics.median,
                                                        (get_rates, libp2p_rates, raw_rates, tcp_rates))
        emit("store_get_throughput", get_rate / 1e9, "GB/s", mib=args.mib, path="direct TCP offer")
        emit("store_get_libp2p_only_throughput", libp2p_rate / 1e9, "GB/s", mib=args.mib)
        emit("bare_libp2p_stream_throughput", raw_rate / 1e9, "GB/s", mib=args.mib)
        emit("tcp_loopback_throughput", tcp_rate / 1e9, "GB/s", mib=args.mib)
        emit("store_get_vs_bare_stream", get_rate / raw_rate, "ratio", target=0.8)
        emit("store_get_libp2p_only_vs_bare_stream", libp2p_rate / raw_rate, "ratio")
    finally:
        server.stdin.close()
        server.wait(30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
