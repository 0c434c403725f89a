"""Pure decisions of federated rounds: client sampling, local training (FedAvg, FedProx), the mean,
and what the coordinator refuses from a plain client."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from swarmlm.errors import UserError, WireError
from swarmlm.privacy import federated, wire
from swarmlm.privacy.coordinator import check_plain_update
from swarmlm.privacy.federated import FlConfig

CLIENTS = [f"peer{i:02d}" for i in range(20)]


def test_sampling_is_deterministic_in_seed_round_and_attempt():
    cfg = FlConfig(clients_per_round=5, seed=3)
    a = federated.choose_clients(CLIENTS, cfg, round=2)
    assert len(a) == 5 and a == federated.choose_clients(list(reversed(CLIENTS)), cfg, round=2)
    assert a != federated.choose_clients(CLIENTS, cfg, round=2, attempt=1)


def test_dp_sampling_is_poisson_at_rate_k_over_n():
    cfg = FlConfig(clients_per_round=5, dp_clip=1.0, dp_noise=1.0, seed=1)
    sizes = [len(federated.choose_clients(CLIENTS, cfg, round=r)) for r in range(300)]
    assert federated.sampling_rate(cfg, len(CLIENTS)) == 0.25
    assert len(set(sizes)) > 3 and abs(np.mean(sizes) - 5) < 0.5       # varies, mean q*N
    assert federated.denominator(cfg, 3, len(CLIENTS)) == 5.0           # fixed q*N, not who came
    assert federated.denominator(FlConfig(), 3, len(CLIENTS)) == 3.0


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def batches(step):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(16, 4, generator=g)
    return x, x.sum(dim=1, keepdim=True) * 3


def mse(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def test_local_training_returns_the_parameter_change_and_fedprox_keeps_it_closer():
    model = make_model()
    before = federated.flatten(model)
    update, loss = federated.local_train(model, batches, steps=20, lr=0.05, mu=0.0, loss_fn=mse)
    assert np.allclose(federated.flatten(model) - before, update) and loss > 0
    prox = make_model()
    update_prox, _ = federated.local_train(prox, batches, steps=20, lr=0.05, mu=5.0, loss_fn=mse)
    assert np.linalg.norm(update_prox) < np.linalg.norm(update)


def test_flat_vectors_round_trip_and_the_sum_is_divided():
    model = make_model()
    v = federated.flatten(model)
    federated.load_flat(model, v + 1.0)
    assert np.allclose(federated.flatten(model), v + 1.0)
    assert np.allclose(federated.apply_sum(v, np.full_like(v, 6.0), 3.0), v + 2.0)
    with pytest.raises(ValueError):
        federated.apply_sum(v, np.zeros(v.size + 1), 1.0)


def test_prepared_update_is_clipped_and_noised_only_with_dp():
    rng = np.random.default_rng(0)
    u = np.full(10_000, 0.05)                       # norm 5
    plain = federated.prepare_update(u, 4.0, dp_clip=0, dp_noise=0, min_clients=2, rng=rng)
    assert np.array_equal(plain, u)
    clipped = federated.prepare_update(u, 4.0, dp_clip=1.0, dp_noise=0, min_clients=2, rng=rng)
    assert np.linalg.norm(clipped) == pytest.approx(1.0)
    noised = federated.prepare_update(u, 4.0, dp_clip=1.0, dp_noise=2.0, min_clients=4, rng=rng)
    assert np.var(noised - clipped) == pytest.approx((2.0 * 1.0) ** 2 / 4, rel=0.05)


def test_plain_updates_of_the_wrong_size_or_out_of_range_are_refused():
    good = np.zeros(8, dtype="<f4")
    assert check_plain_update(good.tobytes(), 8, 1.0).shape == (8,)
    with pytest.raises(WireError, match="7 coordinates"):
        check_plain_update(good[:7].tobytes(), 8, 1.0)
    for bad in (np.full(8, 2.0, dtype="<f4"), np.full(8, np.nan, dtype="<f4")):
        with pytest.raises(WireError, match="outside"):
            check_plain_update(bad.tobytes(), 8, 1.0)


def test_wire_records_round_trip_and_garbage_is_refused():
    msg = wire.Report(round=1, attempt=0, train_loss=2.5, val_loss=2.7, n_samples=16)
    assert wire.decode(wire.encode(msg)) == msg
    for junk in (b"", b"\x63abc", b"\x04\x93\x01\x02"):
        with pytest.raises(WireError):
            wire.decode(junk)


def test_impossible_configs_are_refused():
    for kwargs in ({"min_clients": 6, "clients_per_round": 5}, {"secure": True, "min_clients": 1},
                   {"dp_noise": 1.0}, {"rounds": 0}):
        with pytest.raises(UserError):
            FlConfig(**kwargs).check()


def test_the_securely_aggregated_sum_carries_noise_of_variance_sigma_c_squared():
    from swarmlm.p2p.identity import Identity
    from swarmlm.privacy.secagg.local import run_round
    from swarmlm.privacy.secagg.server import SecAggConfig
    m, d, sigma, clip = 4, 20_000, 1.0, 1.0
    rng = np.random.default_rng(5)
    updates = [federated.prepare_update(np.zeros(d), 4.0, dp_clip=clip, dp_noise=sigma, min_clients=m, rng=rng)
               for _ in range(m)]
    total, _ = run_round([Identity.generate() for _ in range(m)], updates, config=SecAggConfig(clip=4.0, max_clients=m))
    assert total.var() == pytest.approx((sigma * clip) ** 2, rel=0.05)        # sd of the estimate ~1%
    assert abs(total.mean()) < 0.05
