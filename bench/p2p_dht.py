"""DHT store/get latency and success rate on N real peers (one process, 127.0.0.1), then after a quarter stop.

    python bench/p2p_dht.py [--peers 16] [--keys 40] [--ttl 300]

Each round stores `--keys` signed records from random peers (one subkey each) and reads each
back from another random peer. Prints one JSON line per result: medians and p90 of latency in
ms, and the share of reads that found the record. Then a quarter of the peers stop (not
cleanly for the DHT: their stored entries just vanish) and the same keys are read again, then
a fresh round of stores and gets runs on the survivors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from swarmlm.p2p import keys  # noqa: E402
from swarmlm.p2p.records import record_type  # noqa: E402


@record_type("bench-dht-note")
@dataclass(frozen=True)
class Note:
    n: int


def emit(name: str, value: float, unit: str, **extra) -> None:
    print(json.dumps({"name": name, "value": round(value, 3), "unit": unit, **extra}), flush=True)


async def timed(coro):
    start = time.perf_counter()
    result = await coro
    return result, (time.perf_counter() - start) * 1000


def report(prefix: str, store_ms: list[float], store_ok: list[bool], get_ms: list[float], found: list[bool]) -> None:
    if store_ms:
        emit(f"{prefix}_store_latency_median", statistics.median(store_ms), "ms")
        emit(f"{prefix}_store_success", sum(store_ok) / len(store_ok), "ratio")
    emit(f"{prefix}_get_latency_median", statistics.median(get_ms), "ms")
    emit(f"{prefix}_get_latency_p90", sorted(get_ms)[int(0.9 * (len(get_ms) - 1))], "ms")
    emit(f"{prefix}_get_success", sum(found) / len(found), "ratio")


async def store_round(peers, n_keys: int, rng: random.Random, tag: str, ttl: float):
    written, store_ms, store_ok = [], [], []
    for i in range(n_keys):
        writer = rng.choice(peers)
        key = keys.PREFIX + f"/bench/{tag}/{i}"
        ok, ms = await timed(writer.store(key, Note(i), ttl_s=ttl, subkey=writer.peer_id))
        store_ms.append(ms)
        store_ok.append(ok)
        written.append((key, writer, i))
    return written, store_ms, store_ok


async def get_round(peers, written, rng: random.Random):
    get_ms, found = [], []
    for key, writer, i in written:
        reader = rng.choice([p for p in peers if p is not writer] or peers)
        records, ms = await timed(reader.get(key, latest=True))
        get_ms.append(ms)
        found.append(any(r.value == Note(i) for r in records))
    return get_ms, found


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=16)
    parser.add_argument("--keys", type=int, default=40)
    parser.add_argument("--ttl", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from swarmlm.p2p.peer import Peer

    rng = random.Random(args.seed)
    start = time.perf_counter()
    first = await Peer.create()
    peers = [first]
    for _ in range(args.peers - 1):
        peers.append(await Peer.create(initial_peers=rng.choice(peers).maddrs))
    emit("dht_swarm_startup", time.perf_counter() - start, "s", peers=args.peers)
    try:
        written, store_ms, store_ok = await store_round(peers, args.keys, rng, "before", args.ttl)
        get_ms, found = await get_round(peers, written, rng)
        report("dht_16", store_ms, store_ok, get_ms, found)

        n_stop = args.peers // 4
        stopped = rng.sample(peers[1:], n_stop)
        for p in stopped:
            await p.shutdown()
        alive = [p for p in peers if p not in stopped]
        survivors_written = [(k, w, i) for k, w, i in written if w in alive]
        get_ms, found = await get_round(alive, survivors_written, rng)
        report(f"dht_after_{n_stop}_stopped_old_keys", [], [], get_ms, found)
        written, store_ms, store_ok = await store_round(alive, args.keys, rng, "after", args.ttl)
        get_ms, found = await get_round(alive, written, rng)
        report(f"dht_after_{n_stop}_stopped_new_keys", store_ms, store_ok, get_ms, found)
    finally:
        for p in peers:
            await p.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
