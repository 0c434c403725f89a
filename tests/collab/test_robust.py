import math

import torch

from swarmlm.collab.robust import aggregate, n_trimmed, validate_updates


def _honest(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1000, generator=g)
    return [base + 0.1 * torch.randn(1000, generator=g) for _ in range(n)]


def test_mean_is_weighted_by_samples():
    a, b = torch.ones(4), torch.zeros(4)
    assert torch.allclose(aggregate("mean", [a, b], [3.0, 1.0]), torch.full((4,), 0.75))


def test_mean_is_derailed_by_one_poisoned_update():
    honest = _honest(3)
    poisoned = honest[:2] + [honest[2] * -100]
    ref = aggregate("mean", honest)
    assert (aggregate("mean", poisoned) - ref).norm() > 10 * ref.norm()


def test_robust_aggregators_resist_one_poisoned_update_of_three():
    honest = _honest(3)
    poisoned = honest[:2] + [honest[2] * -100]
    ref = aggregate("mean", honest)
    for name in ("trimmed-mean", "centered-clip"):
        err = (aggregate(name, poisoned) - ref).norm() / ref.norm()
        assert err < 0.5, (name, float(err))


def test_robust_aggregators_equal_mean_on_identical_updates():
    t = torch.randn(100)
    for name in ("trimmed-mean", "centered-clip"):
        assert torch.allclose(aggregate(name, [t, t.clone(), t.clone()]), t, atol=1e-6)


def test_trimmed_mean_trims_nothing_below_three_peers():
    assert n_trimmed(2) == 0 and n_trimmed(3) == 1 and n_trimmed(8) == 2


def test_validation_drops_bad_updates_with_a_reason():
    good = torch.zeros(5)
    updates = [("a", good, 1.0), ("b", torch.zeros(6), 1.0), ("c", torch.zeros(5, dtype=torch.float64), 1.0),
               ("d", torch.tensor([0, 0, math.nan, 0, 0.0]), 1.0), ("e", torch.tensor([0, math.inf, 0, 0, 0.0]), 1.0),
               ("f", good, -1.0), ("g", "junk", 1.0)]
    kept, dropped = validate_updates(updates, shape=(5,), dtype=torch.float32)
    assert [s for s, _, _ in kept] == ["a"]
    reasons = dict(dropped)
    assert "shape" in reasons["b"] and "dtype" in reasons["c"] and "NaN" in reasons["d"]
    assert "NaN or inf" in reasons["e"] and "weight" in reasons["f"] and "tensor" in reasons["g"]
