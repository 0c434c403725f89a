"""The coordinator over in-memory peers with real side-channel connections: joining twice or badly is
refused, a round left below --min-clients fails clearly and is retried once enough clients are back,
and a client that sends a bad update is left out while the round goes on."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from swarmlm.p2p import keys
from swarmlm.p2p.memory import MemoryNetwork, MemoryPeer
from swarmlm.privacy import wire
from swarmlm.privacy.coordinator import Coordinator, RunRecord
from swarmlm.privacy.federated import FlConfig
from swarmlm.privacy.participant import Participant

D = 1000


class VectorModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(D))


class NoStoreCoordinator(Coordinator):
    async def publish(self, r: int) -> str:
        await self.peer.store(keys.fl_run_key(self.run_id), RunRecord(r, "none", self.cfg.secure), ttl_s=60,
                              subkey=self.peer.peer_id)
        return "none"

    def _save(self, directory: Path) -> Path:
        return directory


class VectorClient(Participant):
    """Its update is all `value`; `leave_in_round` closes its connection as that round starts."""

    def __init__(self, *args, value: float, leave_in_round: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.value, self.leave_in_round = value, leave_in_round

    async def _global_model(self, cid):
        return VectorModel()

    async def _round(self, conn, coordinator, start):
        if start.round == self.leave_in_round and start.attempt == 0:
            conn.abort()
            raise ConnectionError("left on purpose")
        return await super()._round(conn, coordinator, start)

    def _train(self, model, start):
        return np.full(start.length, self.value), 1.0, 1.0


async def make_coordinator(net, tmp_path, **cfg):
    peer = await MemoryPeer.create(net)
    config = FlConfig(**{"local_steps": 1, "coord_clip": 10.0, "round_timeout_s": 10.0, **cfg}).check()
    coord = NoStoreCoordinator(peer, None, None, config, run_id="t", model=VectorModel(), model_cfg=None,
                               tokenizer=None, out=tmp_path / "out", printer=lambda s: None)
    await coord.start()
    await coord.publish(0)
    return coord


def client(net_peer, **kwargs):
    return VectorClient(net_peer, run_id="t", data="", data_dir=None, seed=0, printer=lambda s: None, **kwargs)


@pytest.mark.parametrize("secure", [False, True])
def test_round_below_min_clients_fails_clearly_and_is_retried(tmp_path, secure):
    async def main():
        net = MemoryNetwork()
        coord = await make_coordinator(net, tmp_path, rounds=2, clients_per_round=3, min_clients=3, secure=secure)
        peers = [await MemoryPeer.create(net) for _ in range(4)]
        lines, failed = [], asyncio.Event()

        def printed(line):
            lines.append(line)
            if "round 2 attempt 1 failed" in line:
                failed.set()

        coord.print = printed
        tasks = [asyncio.create_task(client(peers[0], value=1.0).run()),
                 asyncio.create_task(client(peers[1], value=2.0).run()),
                 asyncio.create_task(client(peers[2], value=3.0, leave_in_round=1).run())]
        run = asyncio.create_task(coord.run(start_clients=3))
        await asyncio.wait_for(failed.wait(), 30)
        tasks.append(asyncio.create_task(client(peers[3], value=5.0).run()))   # a replacement joins
        await asyncio.wait_for(run, 30)
        await asyncio.gather(*tasks, return_exceptions=True)
        return lines, coord
    lines, coord = asyncio.run(main())
    rounds = [json.loads(x) for x in (tmp_path / "out" / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1]
    assert rounds[1]["attempt"] == 1 and "fewer than" in rounds[1]["failed_attempts"][0]
    # round 1: mean(1, 2, 3) = 2; round 2 over the replacement: mean(1, 2, 5) = 8/3
    assert np.allclose(coord.params, 2.0 + 8.0 / 3.0, atol=1e-6)


def test_joining_twice_or_with_garbage_is_refused(tmp_path):
    async def main():
        net = MemoryNetwork()
        coord = await make_coordinator(net, tmp_path, rounds=1, clients_per_round=2, min_clients=2)
        peer = await MemoryPeer.create(net)
        side = await peer.side_channel()
        answers = []
        first = await side.open(coord.peer.peer_id, wire.PURPOSE, timeout_s=5, max_record_bytes=1 << 20)
        for payload in (wire.encode(wire.Join("t")), wire.encode(wire.Join("t")), wire.encode(wire.Join("other")),
                        b"\x99junk"):
            conn = first if not answers else await side.open(coord.peer.peer_id, wire.PURPOSE, timeout_s=5,
                                                             max_record_bytes=1 << 20)
            conn.write(payload)
            answers.append(wire.decode(await conn.read_record()))
        return answers, len(coord.members)
    answers, members = asyncio.run(main())
    assert isinstance(answers[0], wire.Welcome)
    assert isinstance(answers[1], wire.Error) and "already joined" in answers[1].message
    assert isinstance(answers[2], wire.Error) and "run 't'" in answers[2].message
    assert isinstance(answers[3], wire.Error)
    assert members == 1


def test_a_bad_plain_update_is_refused_and_the_round_goes_on(tmp_path):
    class Liar(VectorClient):
        async def _send(self, conn, msg):
            if isinstance(msg, wire.Update):
                msg = wire.Update(msg.round, msg.attempt, msg.vector[:-4])         # one coordinate short
            await super()._send(conn, msg)

    async def main():
        net = MemoryNetwork()
        coord = await make_coordinator(net, tmp_path, rounds=1, clients_per_round=3, min_clients=2)
        peers = [await MemoryPeer.create(net) for _ in range(3)]
        tasks = [asyncio.create_task(client(peers[0], value=1.0).run()),
                 asyncio.create_task(client(peers[1], value=3.0).run()),
                 asyncio.create_task(Liar(peers[2], run_id="t", data="", data_dir=None, seed=0,
                                          printer=lambda s: None, value=100.0).run())]
        await asyncio.wait_for(coord.run(start_clients=3), 30)
        await asyncio.gather(*tasks, return_exceptions=True)
        return coord
    coord = asyncio.run(main())
    assert np.allclose(coord.params, 2.0)


def test_dp_rounds_record_the_accounted_event_and_its_epsilon(tmp_path):
    from dp_accounting import dp_event as ev
    from dp_accounting.rdp import rdp_privacy_accountant

    async def main():
        net = MemoryNetwork()
        coord = await make_coordinator(net, tmp_path, rounds=3, clients_per_round=3, min_clients=2, secure=True,
                                       dp_clip=1.0, dp_noise=1.3, seed=2)
        peers = [await MemoryPeer.create(net) for _ in range(4)]
        tasks = [asyncio.create_task(client(p, value=0.5).run()) for p in peers]
        await asyncio.wait_for(coord.run(start_clients=4), 60)
        await asyncio.gather(*tasks, return_exceptions=True)
    asyncio.run(main())
    rounds = [json.loads(x) for x in (tmp_path / "out" / "rounds.jsonl").read_text().splitlines()]
    assert [r["rounds"] for r in rounds] == [1, 2, 3]
    for r in rounds:
        assert r["sampling"] == "poisson" and r["sampling_rate"] == 0.75 and r["noise_multiplier"] == 1.3
        acc = rdp_privacy_accountant.RdpAccountant()
        acc.compose(ev.SelfComposedDpEvent(ev.PoissonSampledDpEvent(r["sampling_rate"],
                                                                    ev.GaussianDpEvent(r["noise_multiplier"])),
                                           r["rounds"]))
        assert r["epsilon"] == acc.get_epsilon(r["delta"])
    assert rounds[0]["epsilon"] < rounds[1]["epsilon"] < rounds[2]["epsilon"]
