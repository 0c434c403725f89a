"""DP-SGD: per-sample gradients equal autograd's one sample at a time, clipping bounds each sample's
influence, and the noise has the stated standard deviation."""

from __future__ import annotations

import pytest
import torch

from swarmlm.privacy.dpsgd import clip_and_noise, dp_sgd_step, noisy_gradient, per_sample_grads


def model_and_data():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    return model, x, y


def ce(out, target):
    return torch.nn.functional.cross_entropy(out, target)


def test_per_sample_gradients_match_autograd_sample_by_sample():
    model, x, y = model_and_data()
    grads = per_sample_grads(model, ce, x, y)
    for i in range(len(x)):
        model.zero_grad()
        ce(model(x[i:i + 1]), y[i:i + 1]).backward()
        for name, p in model.named_parameters():
            assert torch.allclose(grads[name][i], p.grad, atol=1e-6)


def test_clipping_bounds_each_sample_and_a_large_clip_without_noise_is_plain_sgd():
    model, x, y = model_and_data()
    grads = per_sample_grads(model, ce, x, y)
    mean, norms = clip_and_noise(grads, clip=1e-3, noise_multiplier=0.0, generator=None)
    total = torch.sqrt(sum(g.pow(2).sum() for g in mean.values()))
    assert total <= 1e-3 + 1e-9 and norms.min() > 1e-3                   # every sample was clipped
    plain, _ = clip_and_noise(grads, clip=1e6, noise_multiplier=0.0, generator=None)
    model.zero_grad()
    ce(model(x), y).backward()
    for name, p in model.named_parameters():
        assert torch.allclose(plain[name], p.grad, atol=1e-6)


def test_noise_has_std_sigma_times_clip_over_batch():
    grads = {"w": torch.zeros(4, 200_000)}
    noisy, _ = clip_and_noise(grads, clip=0.5, noise_multiplier=2.0, generator=torch.Generator().manual_seed(0))
    assert noisy["w"].std().item() == pytest.approx(2.0 * 0.5 / 4, rel=0.02)


def test_an_empty_poisson_batch_is_a_step_of_noise_alone():
    """Poisson sampling may draw no example (a test run here drew none: a reshape of zero rows failed)."""
    model, x, y = model_and_data()
    quiet = noisy_gradient(model, ce, x[:0], y[:0], clip=1.0, noise_multiplier=0.0, expected_batch=4.0, generator=None)
    assert all(torch.equal(g, torch.zeros_like(p)) for (_, p), g in zip(model.named_parameters(), quiet.values()))
    noisy = noisy_gradient(model, ce, x[:0], y[:0], clip=1.0, noise_multiplier=2.0, expected_batch=4.0,
                           generator=torch.Generator().manual_seed(0))
    assert set(noisy) == {n for n, _ in model.named_parameters()} and all(g.abs().sum() > 0 for g in noisy.values())
    before = [p.detach().clone() for p in model.parameters()]
    loss = dp_sgd_step(model, ce, x[:0], y[:0], clip=1.0, noise_multiplier=1.0, lr=0.1, expected_batch=4.0,
                       generator=torch.Generator().manual_seed(1))
    assert loss != loss and all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))   # NaN loss, noise
    with pytest.raises(ValueError, match="denominator"):
        clip_and_noise({"w": torch.zeros(0, 3)}, clip=1.0, noise_multiplier=1.0, generator=None)


def test_a_dp_sgd_step_moves_the_model_and_refuses_bad_settings():
    model, x, y = model_and_data()
    before = [p.detach().clone() for p in model.parameters()]
    loss = dp_sgd_step(model, ce, x, y, clip=1.0, noise_multiplier=1.0, lr=0.1,
                       generator=torch.Generator().manual_seed(1))
    assert loss > 0 and any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError):
        dp_sgd_step(model, ce, x, y, clip=0.0, noise_multiplier=1.0, lr=0.1)


def test_per_sample_gradients_work_on_the_transformer():
    import dataclasses
    import warnings

    from swarmlm.model.config import PRESETS
    from swarmlm.model.transformer import Transformer
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(PRESETS["tiny"], vocab_size=128, n_layers=1))
    x, y = torch.randint(0, 128, (2, 8)), torch.randint(0, 128, (2, 8))

    def lm(out, target):
        return torch.nn.functional.cross_entropy(out.reshape(-1, out.size(-1)), target.reshape(-1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                 # no vmap rule for CPU flash attention's backward yet
        grads = per_sample_grads(model, lm, x, y)
    model.zero_grad()
    lm(model(x[1:]), y[1:]).backward()
    name, p = next((n, p) for n, p in model.named_parameters() if p.grad is not None)
    assert torch.allclose(grads[name][1], p.grad, atol=1e-5)
