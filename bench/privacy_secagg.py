"""Secure aggregation against plain federated rounds, and SecAgg+ at scale.

    python bench/privacy_secagg.py [--params 1000000 100000] [--clients 5] [--rounds 5]
                                   [--scale-clients 100 1000] [--scale-params 100000]

1. Rounds over the network: a coordinator and `--clients` clients (privacy/coordinator.py and
   participant.py, as `swarmlm fl` runs them), the clients either each in its own process on
   a real peer (as Flower's SuperNodes were measured), or all in this process on in-memory
   peers; either way their side channels are real encrypted TCP connections on 127.0.0.1. Local training is replaced by a
   random update of `--params` coordinates, so with `--train-s 0` a round's time is what aggregation costs:
   sending the round, the clients' updates (plain) or the four secure-aggregation stages
   (key agreement, Shamir shares, masks, unmasking), and the sum. Plain and secure rounds
   alternate in one session (the same clients and connections, under the same load): two
   untimed warm-up rounds, then the median of `--rounds` of each. With `--train-s S` each client also "trains" for S seconds as if
   on its own machine (a sleep): secure clients share keys and expand their masks meanwhile, as
   they would in a real round. Printed: round seconds of each side, their ratio (target
   <= 1.3 at 1M; Flower's SecAgg+ measured here: 1.9x at 1.2M, 4.1-4.6x at 100k), the secure
   round's median stage breakdown (`stage_s`: per stage, [waiting for the clients, closing the
   stage] seconds, from rounds.jsonl), and bytes sent per client per round, secure / plain
   (target <= 1.1 at 1M; Bonawitz 2017: 1.73x).
2. SecAgg+ in one process (secagg/local.py, the same signed messages, no network): 100 and
   1000 clients of `--scale-params` coordinates on the sparse graph. Printed: the median
   client's time over its four stages (wall clock, and its thread's CPU time, steadier on a
   shared machine), the growth from the smallest to the largest count (target <= 1.5x), and
   the coordinator's time.
In-process, the clients' work is serialized in both sides alike; as processes, five clients
share the machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from swarmlm.p2p.identity import Identity  # noqa: E402
from swarmlm.p2p.memory import MemoryNetwork, MemoryPeer  # noqa: E402
from swarmlm.p2p import keys  # noqa: E402
from swarmlm.privacy.coordinator import Coordinator, RunRecord  # noqa: E402
from swarmlm.privacy.federated import FlConfig  # noqa: E402
from swarmlm.privacy.participant import Participant  # noqa: E402
from swarmlm.privacy.secagg import graph  # noqa: E402
from swarmlm.privacy.secagg.local import RoundTimes, run_round  # noqa: E402
from swarmlm.privacy.secagg.server import SecAggConfig  # noqa: E402


def emit(name: str, value: float, unit: str, **extra) -> None:
    print(json.dumps({"name": name, "value": round(value, 6), "unit": unit, **extra}), flush=True)


class VectorModel(torch.nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(d))


class BenchCoordinator(Coordinator):
    """No store: the round names a placeholder model, and nothing is saved. Rounds alternate
    plain, secure, plain, ... (clients follow each round's flag), so both sides are measured in
    the same session, on the same connections, under the same load."""

    async def publish(self, r: int) -> str:
        return "bench"

    def _save(self, directory: Path) -> Path:
        return directory

    async def _round(self, r: int, attempt: int):
        self.cfg = dataclasses.replace(self.cfg, secure=bool(r % 2))
        return await super()._round(r, attempt)


class BenchParticipant(Participant):
    """No model, no data: a random update of the round's length stands for local training."""

    def __init__(self, *args, d: int, train_s: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.d, self.train_s = d, train_s
        self.update = np.random.default_rng(seed=kwargs.get("seed")).normal(0, 0.01, d)   # drawn once, untimed
        self.sent_by_kind = {False: 0, True: 0}           # bytes sent in plain and in secure rounds
        self.secure = False

    async def _round(self, conn, coordinator, start):
        self.secure = start.secure
        return await super()._round(conn, coordinator, start)

    async def _send(self, conn, msg):
        before = self.bytes_sent
        await super()._send(conn, msg)
        self.sent_by_kind[self.secure] += self.bytes_sent - before

    async def _global_model(self, cid: str):
        return VectorModel(self.d)

    def _train(self, model, start):
        if self.train_s:
            time.sleep(self.train_s)         # a client training on its own machine: no CPU of ours
        return self.update, 1.0, 1.0


def _config(n_clients: int, rounds: int) -> FlConfig:
    # 2 warm-up rounds, then `rounds` of each kind, alternating
    return FlConfig(rounds=2 * rounds + 2, clients_per_round=n_clients, min_clients=n_clients, local_steps=1,
                    coord_clip=1.0).check()


def _results(out: Path, sent: list[dict], rounds: int) -> dict:
    lines = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()][2:]
    shutil.rmtree(out, ignore_errors=True)
    res = {kind: ([x["seconds"] for x in lines if x["secure"] == kind],
                  statistics.median(s[kind] for s in sent) / (rounds + 1)) for kind in (False, True)}
    stages = [x["stage_s"] for x in lines if x.get("stage_s")]
    res["stage_s"] = {name: [round(statistics.median(s[name][i] for s in stages), 4) for i in range(2)]
                      for name in (stages[0] if stages else {})}
    return res


async def network_rounds(d: int, n_clients: int, rounds: int, train_s: float = 0.0) -> dict:
    """{secure?: (seconds of each timed round, bytes each client sent per round)}, clients in this process."""
    net = MemoryNetwork()
    coord_peer = await MemoryPeer.create(net)
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"swarmlm-bench-fl-{os.getpid()}"
    coord = BenchCoordinator(coord_peer, None, None, _config(n_clients, rounds), run_id="bench",
                             model=VectorModel(d), model_cfg=None, tokenizer=None, out=out, printer=lambda s: None)
    await coord.start()
    await coord_peer.store(keys.fl_run_key("bench"), RunRecord(0, "bench", False), ttl_s=600,
                           subkey=coord_peer.peer_id)
    peers = [await MemoryPeer.create(net) for _ in range(n_clients)]
    clients = [BenchParticipant(p, run_id="bench", data="", data_dir=None, seed=i, printer=lambda s: None, d=d,
                                train_s=train_s)
               for i, p in enumerate(peers)]
    tasks = [asyncio.create_task(c.run()) for c in clients]
    await coord.run()
    await asyncio.gather(*tasks)
    for p in [coord_peer, *peers]:
        await p.shutdown()
    return _results(out, [c.sent_by_kind for c in clients], rounds)


async def process_rounds(d: int, n_clients: int, rounds: int, train_s: float = 0.0) -> dict:
    """As network_rounds, with each client its own process on a real peer (hivemind DHT, side channel)."""
    import subprocess

    from swarmlm.p2p.peer import Peer
    coord_peer = await Peer.create(host="127.0.0.1")
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"swarmlm-bench-fl-{os.getpid()}"
    coord = BenchCoordinator(coord_peer, None, None, _config(n_clients, rounds), run_id="bench",
                             model=VectorModel(d), model_cfg=None, tokenizer=None, out=out, printer=lambda s: None)
    children = []
    try:
        await coord.start()
        await coord_peer.store(keys.fl_run_key("bench"), RunRecord(0, "bench", False), ttl_s=600,
                               subkey=coord_peer.peer_id)
        children = [subprocess.Popen([sys.executable, __file__, "--child", coord_peer.maddrs[0], str(d), str(i),
                                      str(train_s)], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
                    for i in range(n_clients)]
        await coord.run()
        sent = [json.loads((await asyncio.to_thread(c.communicate, timeout=120))[0]) for c in children]
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
        await coord_peer.shutdown()
    return _results(out, [{False: s[0], True: s[1]} for s in sent], rounds)


async def child(maddr: str, d: int, seed: int, train_s: float) -> None:
    from swarmlm.p2p.peer import Peer
    peer = await Peer.create(initial_peers=[maddr], host="127.0.0.1")
    try:
        client = BenchParticipant(peer, run_id="bench", data="", data_dir=None, seed=seed, printer=lambda s: None,
                                  d=d, train_s=train_s)
        await client.run()
        print(json.dumps([client.sent_by_kind[False], client.sent_by_kind[True]]), flush=True)
    finally:
        await peer.shutdown()


def scale(n: int, d: int) -> tuple[float, float, float]:
    """(median client seconds, its CPU seconds, coordinator seconds) of one in-process SecAgg+ round."""
    ids = [Identity.generate() for _ in range(n)]
    rng = np.random.default_rng(0)
    updates = [rng.normal(0, 0.01, d) for _ in range(n)]
    times = RoundTimes()
    run_round(ids, updates, config=SecAggConfig(clip=1.0, max_clients=n), times=times)
    return statistics.median(times.client_s.values()), statistics.median(times.client_cpu_s.values()), times.server_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int, nargs="+", default=[1_000_000, 100_000])
    ap.add_argument("--clients", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--train-s", type=float, nargs="+", default=[0.0, 0.5],
                    help="seconds each client 'trains' (sleeps, as if on its own machine); 0: aggregation only")
    ap.add_argument("--scale-clients", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--scale-params", type=int, default=100_000)
    ap.add_argument("--clients-as", choices=["processes", "in-process", "both"], default="both",
                    help="clients as their own processes on real peers, or all in this process on in-memory peers")
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        asyncio.run(child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])))
        return
    args = ap.parse_args()
    torch.set_num_threads(1)
    modes = {"processes": [process_rounds], "in-process": [network_rounds],
             "both": [process_rounds, network_rounds]}[args.clients_as]
    for d in args.params:
        for mode in modes:
            where = "processes" if mode is process_rounds else "in-process"
            for train_s in args.train_s:
                res = asyncio.run(mode(d, args.clients, args.rounds, train_s))
                (plain, plain_bytes), (secure, secure_bytes) = res[False], res[True]
                p, s = statistics.median(plain), statistics.median(secure)
                emit("fl_round_plain", p, "s", params=d, clients=args.clients, train_s=train_s, clients_as=where)
                emit("fl_round_secure", s, "s", params=d, clients=args.clients, train_s=train_s, clients_as=where)
                emit("fl_round_secure_over_plain", s / p, "x", params=d, train_s=train_s, clients_as=where,
                     target=1.3 if d >= 1_000_000 else None)
                emit("fl_round_secure_stages", sum(sum(v) for v in res["stage_s"].values()), "s", params=d,
                     train_s=train_s, clients_as=where, stage_s=res["stage_s"])
        emit("fl_bytes_per_client_secure_over_plain", secure_bytes / plain_bytes, "x", params=d,
             plain_bytes=plain_bytes, secure_bytes=secure_bytes, target=1.1)
    per_client, per_client_cpu = {}, {}
    for n in args.scale_clients:
        client_s, client_cpu_s, server_s = scale(n, args.scale_params)
        per_client[n], per_client_cpu[n] = client_s, client_cpu_s
        emit("secagg_plus_client", client_s, "s", clients=n, params=args.scale_params, cpu_s=client_cpu_s,
             degree=graph.default_degree(n))
        emit("secagg_plus_coordinator", server_s, "s", clients=n, params=args.scale_params)
    lo, hi = min(per_client), max(per_client)
    emit("secagg_plus_client_growth", per_client[hi] / per_client[lo], "x", clients_from=lo, clients_to=hi,
         target=1.5, cpu_growth=per_client_cpu[hi] / per_client_cpu[lo])


if __name__ == "__main__":
    main()
