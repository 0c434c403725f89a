"""The demo's federated round: secure aggregation with DP among in-process peers, reporting ε."""

from __future__ import annotations

import pytest
from dp_accounting import dp_event as ev
from dp_accounting.rdp import rdp_privacy_accountant

from swarmlm.demo.federated import DP_DELTA, DP_NOISE, run_federated_round
from tests.privacy.fl_setup import build_model


def test_the_demo_round_aggregates_securely_and_reports_the_accountants_epsilon(tmp_path):
    model = build_model(tmp_path / "model")
    summary = run_federated_round(model, tmp_path / "fl", n_clients=3)
    assert summary["clients"] == 3 and summary["dropped"] == 0 and summary["secure"]
    acc = rdp_privacy_accountant.RdpAccountant()
    acc.compose(ev.SelfComposedDpEvent(ev.PoissonSampledDpEvent(1.0, ev.GaussianDpEvent(DP_NOISE)), 1))
    assert summary["epsilon"] == pytest.approx(acc.get_epsilon(DP_DELTA), rel=1e-12)
    assert (tmp_path / "fl" / "out" / "model.safetensors").is_file()
