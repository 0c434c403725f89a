"""Client-level DP: clipping, distributed noise whose sum has the stated variance, Poisson sampling,
and ε equal to dp-accounting's own for the recorded event."""

from __future__ import annotations

import math

import numpy as np
import pytest
from dp_accounting import dp_event as ev
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import stats

from swarmlm.privacy import dp


def test_clipping_bounds_the_norm_and_leaves_small_updates_alone():
    big = np.full(100, 1.0)                                  # norm 10
    clipped, norm = dp.clip_update(big, 2.0)
    assert norm == pytest.approx(10.0) and np.linalg.norm(clipped) == pytest.approx(2.0)
    small = np.full(4, 0.1)
    assert np.array_equal(dp.clip_update(small, 2.0)[0], small)
    with pytest.raises(ValueError):
        dp.clip_update(np.array([np.inf]), 1.0)


def test_summed_noise_shares_have_variance_sigma_c_squared():
    sigma, clip, m, d = 1.3, 0.5, 5, 200_000
    rng = np.random.default_rng(0)
    total = sum(dp.noise_share(d, clip=clip, noise_multiplier=sigma, min_clients=m, rng=rng) for _ in range(m))
    expected = (sigma * clip) ** 2
    # the sample variance of d normal draws: relative standard error sqrt(2/d) ~ 0.3%
    assert total.var() == pytest.approx(expected, rel=0.02)
    assert stats.normaltest(total[:5000]).pvalue > 1e-3


def test_poisson_sampling_is_seeded_and_has_the_stated_rate():
    clients = [f"c{i:04d}" for i in range(2000)]
    a = dp.poisson_sample(clients, 0.1, seed=7, round=3)
    assert a == dp.poisson_sample(list(reversed(clients)), 0.1, seed=7, round=3)   # order of arrival is irrelevant
    assert a != dp.poisson_sample(clients, 0.1, seed=7, round=4)
    assert abs(len(a) - 200) < 4 * math.sqrt(2000 * 0.1 * 0.9)
    assert dp.poisson_sample(clients, 1.0, seed=0, round=0) == sorted(clients)


@pytest.mark.parametrize("q,sigma,rounds,delta", [(1.0, 1.1, 3, 1e-5), (0.2, 0.8, 20, 1e-6)])
def test_epsilon_is_the_accountants_for_the_recorded_event(q, sigma, rounds, delta):
    record = dp.event_record(dp.DpConfig(clip=1.0, noise_multiplier=sigma, delta=delta), q, rounds)
    event = ev.SelfComposedDpEvent(ev.PoissonSampledDpEvent(record["sampling_rate"],
                                                            ev.GaussianDpEvent(record["noise_multiplier"])),
                                   record["rounds"])
    acc = rdp_privacy_accountant.RdpAccountant()
    acc.compose(event)
    assert record["sampling"] == "poisson"
    assert record["epsilon"] == acc.get_epsilon(record["delta"])
    pld = pld_privacy_accountant.PLDAccountant()
    pld.compose(event)
    assert dp.epsilon(q, sigma, rounds, delta, accountant="pld") == pld.get_epsilon(delta)


def test_known_value_from_the_anchors():
    assert dp.epsilon(1.0, 1.1, 3, 1e-5) == pytest.approx(8.04, abs=0.01)   # RDP, as measured on this machine


def test_bad_dp_settings_are_refused():
    for kwargs in ({"clip": 0.0, "noise_multiplier": 1.0}, {"clip": 1.0, "noise_multiplier": -1.0},
                   {"clip": 1.0, "noise_multiplier": 1.0, "delta": 1.0}):
        with pytest.raises(ValueError):
            dp.DpConfig(**kwargs)
