"""Federated rounds over LoRA adapters (in process, in-memory peers, real side channels and store):
only the adapted projections change, and secure and plain rounds agree."""

from __future__ import annotations

import asyncio

import torch
from safetensors.torch import load_file

from swarmlm.p2p.memory import MemoryNetwork, MemoryPeer
from swarmlm.privacy.federated import FlConfig
from swarmlm.privacy.inprocess import run_in_process
from tests.privacy.fl_setup import build_model, write_shards


def run(model, shards, work, secure):
    cfg = FlConfig(rounds=2, clients_per_round=3, min_clients=3, local_steps=2, secure=secure, lora_rank=4,
                   seed=1).check()

    async def main():
        net = MemoryNetwork()
        peers = [await MemoryPeer.create(net) for _ in range(4)]
        try:
            return await run_in_process(peers, model, shards, cfg, run_id=f"lora-{secure}", work=work)
        finally:
            for p in peers:
                await p.shutdown()
    return asyncio.run(main())


def test_lora_rounds_change_only_the_adapted_projections_and_secure_equals_plain(tmp_path):
    model = build_model(tmp_path / "model")
    shards = write_shards(tmp_path / "data")[:3]
    plain_rounds = run(model, shards, tmp_path / "plain", secure=False)
    run(model, shards, tmp_path / "secure", secure=True)
    start = load_file(model / "model.safetensors")
    plain = load_file(tmp_path / "plain" / "out" / "model.safetensors")
    secure = load_file(tmp_path / "secure" / "out" / "model.safetensors")
    changed = {k for k in start if not torch.equal(start[k], plain[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
    assert max((plain[k] - secure[k]).abs().max().item() for k in plain) <= 1e-5
    assert len(plain_rounds) == 2 and plain_rounds[-1]["clients"] == 3
