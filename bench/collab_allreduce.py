"""Averaging N float32 values among P peer processes on loopback: swarmlm's all-reduce
(matchmaking over libp2p + butterfly over the peers' encrypted side channel, collab/) against
hivemind's DecentralizedAverager (the comparison side only) and torch.distributed gloo all_reduce.

    python bench/collab_allreduce.py [--sizes 10000000 50000000] [--peers 2 4] [--rounds 3]
                                     [--sides swarmlm swarmlm-libp2p hivemind gloo]

`swarmlm` moves the parts over the side channel (AES-256-GCM records, as `swarmlm train
--swarm` does by default); `swarmlm-libp2p` is the same round with `transport="libp2p"`: every
part over libp2p's encrypted streams, as `--collab-transport libp2p` trains. Both encrypt, so
their ratio is what the side channel saves over libp2p for the same encrypted transfer.

Each side starts its P processes, does one untimed warm-up round per size, then times
`--rounds` rounds, all processes released together by a barrier; a round's time is the
slowest process's. Prints one JSON line per result with the median, and the ratios
hivemind / swarmlm (how many times faster swarmlm is), swarmlm-libp2p / swarmlm and
swarmlm / gloo. bench/p2p_channel_cost.py measures what the encryption itself costs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import queue
import statistics
import sys
import time

import torch


def _ours(rank, n, sizes, rounds, maddr_q, ids_q, members_q, barrier, out_q, transport="auto"):
    torch.set_num_threads(1)
    from swarmlm.collab.allreduce import AllReduce
    from swarmlm.collab.matchmaking import Matchmaker
    from swarmlm.errors import RoundFailed
    from swarmlm.p2p.peer import Peer

    async def main():
        loop = asyncio.get_running_loop()
        initial = [] if rank == 0 else [await loop.run_in_executor(None, maddr_q.get)]
        peer = await Peer.create(initial_peers=initial, host="127.0.0.1")
        if rank == 0:
            for _ in range(n - 1):
                maddr_q.put(peer.maddrs[0])
        reducer = await AllReduce.create(peer, transport=transport, wait_for_round_s=600)
        mm = await Matchmaker.create(peer, "bench", gather_timeout_s=60)
        ids_q.put(peer.peer_id)
        members = await loop.run_in_executor(None, members_q.get)     # keep serving the DHT meanwhile
        step = 0
        for numel in [1000] + list(sizes):
            vec = torch.randn(numel)
            times = []
            for i in range(1 if numel == 1000 else rounds + 1):    # the first round of a size warms up
                await asyncio.get_running_loop().run_in_executor(None, barrier.wait)
                t0 = time.perf_counter()
                while True:                                 # a failed round is redone, and counted in the time
                    group, _ = await mm.form_group(step, members, timeout_s=600)
                    try:
                        res = await reducer.run(group, vec, weight=1.0, timeout_s=600)
                        break
                    except RoundFailed as e:
                        print(f"# rank {rank}: {e}; again", file=sys.stderr)
                        await mm.abandon(step)
                times.append(time.perf_counter() - t0)
                step += 1
                await mm.set_step(step)
                assert res.vector.numel() == numel
            if numel != 1000:
                out_q.put((rank, numel, times[1:]))
        await asyncio.get_running_loop().run_in_executor(None, barrier.wait)
        await peer.shutdown()
    asyncio.run(main())


def _hivemind(rank, n, sizes, rounds, maddr_q, ids_q, members_q, barrier, out_q):
    torch.set_num_threads(1)
    mp.set_start_method("fork", force=True)        # hivemind forks its DHT and averager processes
    import hivemind
    from hivemind.averaging import DecentralizedAverager
    initial = [] if rank == 0 else [maddr_q.get()]
    dht = hivemind.DHT(initial_peers=initial, start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                       nat_port_map=False, auto_nat=False, startup_timeout=60)
    if rank == 0:
        for _ in range(n - 1):
            maddr_q.put(str(dht.get_visible_maddrs()[0]))
    for numel in [1000] + list(sizes):
        averager = DecentralizedAverager([torch.randn(numel)], dht, start=True, prefix=f"bench{numel}",
                                         target_group_size=n, min_group_size=n, min_matchmaking_time=1.0,
                                         request_timeout=10.0, allreduce_timeout=600)
        times = []
        for _ in range(1 if numel == 1000 else rounds + 1):
            barrier.wait()
            t0 = time.perf_counter()
            ok = averager.step(timeout=600)
            times.append(time.perf_counter() - t0 if ok is not None else float("nan"))
        averager.shutdown()
        if numel != 1000:
            out_q.put((rank, numel, times[1:]))
    barrier.wait()
    dht.shutdown()


def _gloo(rank, n, sizes, rounds, port, barrier, out_q):
    torch.set_num_threads(1)
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=n)
    for numel in [1000] + list(sizes):
        t = torch.randn(numel)
        times = []
        for _ in range(1 if numel == 1000 else rounds + 1):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(t)
            t /= n
            times.append(time.perf_counter() - t0)
        if numel != 1000:
            out_q.put((rank, numel, times[1:]))
    dist.destroy_process_group()


def _run(kind, n, sizes, rounds):
    ctx = mp.get_context("spawn")
    out_q = ctx.Queue()
    barrier = ctx.Barrier(n)
    if kind == "gloo":
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = [ctx.Process(target=_gloo, args=(r, n, sizes, rounds, port, barrier, out_q)) for r in range(n)]
    else:
        maddr_q, ids_q, members_q = ctx.Queue(), ctx.Queue(), ctx.Queue()
        target = _hivemind if kind == "hivemind" else _ours
        extra = ("libp2p",) if kind == "swarmlm-libp2p" else ()
        procs = [ctx.Process(target=target, args=(r, n, sizes, rounds, maddr_q, ids_q, members_q, barrier, out_q,
                                                  *extra))
                 for r in range(n)]
    for p in procs:
        p.start()
    if kind.startswith("swarmlm"):
        ids = sorted(ids_q.get(timeout=300) for _ in range(n))
        for _ in range(n):
            members_q.put(ids)
    results: dict[int, list[list[float]]] = {}
    for _ in range(n * len(sizes)):
        while True:
            try:
                _, numel, times = out_q.get(timeout=5)
                break
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    for p in procs:
                        p.kill()
                    raise RuntimeError(f"a {kind} process died") from None
        results.setdefault(numel, []).append(times)
    for p in procs:
        p.join(120)
        if p.is_alive():
            p.kill()
    # a round lasts as long as its slowest process
    return {numel: statistics.median(max(ts) for ts in zip(*per_rank)) for numel, per_rank in results.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000_000, 50_000_000])
    ap.add_argument("--peers", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sides", nargs="+", default=["swarmlm", "swarmlm-libp2p", "hivemind", "gloo"],
                    choices=["swarmlm", "hivemind", "gloo", "swarmlm-libp2p"])
    args = ap.parse_args()
    for n in args.peers:
        medians = {side: _run(side, n, args.sizes, args.rounds) for side in args.sides}
        for numel in args.sizes:
            for side in args.sides:
                print(json.dumps({"name": f"allreduce_{side}_{n}peers_{numel // 1_000_000}M_s",
                                  "value": round(medians[side][numel], 4), "unit": "s"}), flush=True)
            ours = medians.get("swarmlm", {}).get(numel)
            if ours and "hivemind" in medians:
                print(json.dumps({"name": f"allreduce_speedup_vs_hivemind_{n}peers_{numel // 1_000_000}M",
                                  "value": round(medians["hivemind"][numel] / ours, 2), "unit": "x"}), flush=True)
            if ours and "swarmlm-libp2p" in medians:
                print(json.dumps({"name": f"allreduce_side_vs_libp2p_{n}peers_{numel // 1_000_000}M",
                                  "value": round(medians["swarmlm-libp2p"][numel] / ours, 2), "unit": "x"}), flush=True)
            if ours and "gloo" in medians:
                print(json.dumps({"name": f"allreduce_vs_gloo_{n}peers_{numel // 1_000_000}M",
                                  "value": round(medians["gloo"][numel] / ours, 3), "unit": "x (gloo time / ours)"}),
                      flush=True)


if __name__ == "__main__":
    sys.exit(main())
