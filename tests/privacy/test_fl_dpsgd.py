"""Sample-level DP-SGD in federated rounds (in process, in-memory peers, real side channels): the
round tells clients to train with DP-SGD, local batches are Poisson-sampled at q = B / n, each
step's update is clipped and really noised, each client's reported ε is the accountant's for the
event it states, the coordinator records the largest, and a client that cannot honour it refuses."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from swarmlm.errors import UserError
from swarmlm.model.config import PRESETS
from swarmlm.model.transformer import Transformer
from swarmlm.p2p.memory import MemoryNetwork, MemoryPeer
from swarmlm.privacy import federated
from swarmlm.privacy.participant import Participant
from tests.privacy.test_coordinator import make_coordinator

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")     # vmap over CPU attention's backward

VOCAB, SEQ = 128, 16


def tiny_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(dataclasses.replace(PRESETS["tiny"], vocab_size=VOCAB, n_layers=1))


class TokenClient(Participant):
    """A real client on synthetic token ids (its model built locally rather than fetched)."""

    def __init__(self, peer, *, seed: int, n_examples: int):
        super().__init__(peer, run_id="t", data="", data_dir=None, seed=seed, printer=lambda s: None)
        rng = np.random.default_rng(100 + seed)
        self.tokens = SimpleNamespace(train=rng.integers(0, VOCAB, n_examples * (SEQ + 1)),
                                      val=rng.integers(0, VOCAB, 4 * (SEQ + 1)))

    async def _global_model(self, cid):
        model = tiny_model()
        for p in model.parameters():
            p.requires_grad_(True)
        return model


def dp_round(tmp_path, *, n_clients=3, n_examples=(64, 80, 96), **cfg):
    async def main():
        net = MemoryNetwork()
        coord = await make_coordinator(net, tmp_path, clients_per_round=n_clients, min_clients=n_clients,
                                       batch_size=8, seq_len=SEQ, **cfg)
        coord.model = tiny_model()
        coord.params = federated.flatten(coord.model)
        start = coord.params.copy()
        peers = [await MemoryPeer.create(net) for _ in range(n_clients)]
        tasks = [asyncio.create_task(TokenClient(p, seed=i, n_examples=n).run())
                 for i, (p, n) in enumerate(zip(peers, n_examples))]
        await asyncio.wait_for(coord.run(start_clients=n_clients), 60)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        return coord.params - start, results
    delta, results = asyncio.run(main())
    rounds = [json.loads(x) for x in (tmp_path / "out" / "rounds.jsonl").read_text().splitlines()]
    return delta, rounds, results


@pytest.mark.parametrize("client_dp", [False, True])
def test_each_client_reports_the_accountants_epsilon_and_the_coordinator_records_the_largest(tmp_path, client_dp):
    from dp_accounting import dp_event as ev
    from dp_accounting.rdp import rdp_privacy_accountant
    both = {"dp_clip": 5.0, "dp_noise": 0.8} if client_dp else {}
    _, rounds, _ = dp_round(tmp_path, rounds=2, local_steps=2, lr=0.05, dp_sgd_clip=1.0, dp_sgd_noise=1.1,
                            dp_delta=1e-4, **both)
    assert len(rounds) == 2
    for r, rec in enumerate(rounds):
        s = rec["sample_dp"]
        assert (s["sampling"], s["noise_multiplier"], s["clip"], s["delta"]) == ("poisson", 1.1, 1.0, 1e-4)
        assert sorted(c["sampling_rate"] for c in s["clients"].values()) == [8 / 96, 8 / 80, 8 / 64]
        for c in s["clients"].values():
            assert c["steps"] == 2 * (r + 1)
            acc = rdp_privacy_accountant.RdpAccountant()
            acc.compose(ev.SelfComposedDpEvent(ev.PoissonSampledDpEvent(c["sampling_rate"], ev.GaussianDpEvent(1.1)),
                                               c["steps"]))
            assert c["epsilon"] == acc.get_epsilon(1e-4)
        assert s["epsilon"] == max(c["epsilon"] for c in s["clients"].values())
        if client_dp:                                     # client-level DP on as well: its own event, unchanged
            assert (rec["sampling_rate"], rec["noise_multiplier"], rec["rounds"]) == (1.0, 0.8, r + 1)
            assert 0 < rec["epsilon"] < float("inf")
        else:
            assert "epsilon" not in rec
    assert rounds[0]["sample_dp"]["epsilon"] < rounds[1]["sample_dp"]["epsilon"] < float("inf")


@pytest.mark.parametrize("secure", [False, True])
def test_a_huge_sigma_gives_the_updates_variance_sigma_c_over_b_squared(tmp_path, secure):
    sigma, clip, lr, steps, n, b = 2000.0, 1.0, 1e-3, 2, 3, 8
    delta, rounds, _ = dp_round(tmp_path, rounds=1, local_steps=steps, lr=lr, dp_sgd_clip=clip, dp_sgd_noise=sigma,
                                secure=secure)
    # each client: `steps` steps of lr · N(0, (σC/B)²) noise (the clipped gradients are ≤ lr·C·b/B: negligible);
    # the coordinator averages n clients
    expected = steps * (lr * sigma * clip / b) ** 2 / n
    d = delta.size
    assert d > 20_000
    assert np.var(delta) == pytest.approx(expected, rel=6 * np.sqrt(2 / d))
    assert abs(np.mean(delta)) < 6 * np.sqrt(expected / d)
    assert rounds[0]["sample_dp"]["epsilon"] < 0.01


def test_without_noise_a_tiny_clip_bounds_each_step_by_lr_c_times_its_batch_over_b():
    model = tiny_model()
    rng = np.random.default_rng(0)
    windows = torch.from_numpy(rng.integers(0, VOCAB, (64, SEQ + 1)))
    sizes = []

    def examples(idx):
        sizes.append(len(idx))
        return windows[idx, :-1], windows[idx, 1:]

    def loss(logits, y):
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
    lr, clip, b = 0.1, 1e-4, 8
    for _ in range(3):                                    # one step at a time: each step's own bound
        sizes.clear()
        update, _ = federated.local_train_dp_sgd(model, examples, 64, steps=1, lr=lr, mu=0.0, batch_size=b, clip=clip,
                                                 noise_multiplier=0.0, per_sample_loss=loss, rng=rng,
                                                 generator=torch.Generator().manual_seed(0))
        assert 0 < np.linalg.norm(update) <= lr * clip * sizes[0] / b * (1 + 1e-4)
    plain, _ = federated.local_train(tiny_model(), lambda step: examples(np.arange(8)), steps=1, lr=lr, mu=0.0,
                                     loss_fn=lambda m, x, y: loss(m(x), y))
    assert np.linalg.norm(plain) > 100 * lr * clip     # without clipping the step is far larger


def test_poisson_batches_have_the_accounted_rate():
    from swarmlm.privacy.dpsgd import poisson_indices
    rng = np.random.default_rng(1)
    sizes = [len(poisson_indices(200, 0.04, rng)) for _ in range(4000)]
    assert np.mean(sizes) == pytest.approx(8, rel=0.03) and np.var(sizes) == pytest.approx(200 * 0.04 * 0.96, rel=0.1)
    with pytest.raises(ValueError):
        poisson_indices(10, 1.5, rng)


def test_a_client_with_fewer_examples_than_the_batch_refuses_the_round_with_a_clear_error(tmp_path):
    async def main():
        net = MemoryNetwork()
        coord = await make_coordinator(net, tmp_path, rounds=1, clients_per_round=1, min_clients=1, batch_size=8,
                                       seq_len=SEQ, dp_sgd_clip=1.0, dp_sgd_noise=1.0)
        coord.model = tiny_model()
        coord.params = federated.flatten(coord.model)
        run = asyncio.create_task(coord.run(start_clients=1))
        try:
            with pytest.raises(UserError, match="cannot honour DP-SGD: its data holds 5 examples of 17 tokens"):
                await asyncio.wait_for(TokenClient(await MemoryPeer.create(net), seed=0, n_examples=5).run(), 30)
        finally:
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
    asyncio.run(main())


def test_a_round_stating_impossible_dp_sgd_settings_is_refused():
    client = TokenClient(None, seed=0, n_examples=64)
    for clip, noise, message in ((0.0, 1.0, "--dp-sgd-clip must be positive"), (-1.0, 0.0, "--dp-sgd-clip must be"),
                                 (float("nan"), 1.0, "--dp-sgd-clip must be positive"),
                                 (1.0, -1.0, "--dp-sgd-noise must be zero or positive")):
        start = SimpleNamespace(seq_len=SEQ, batch_size=8, dp_sgd_clip=clip, dp_sgd_noise=noise, dp_delta=1e-5)
        with pytest.raises(UserError, match=message):
            client._train_dp_sgd(tiny_model(), start, client.tokens.train)
