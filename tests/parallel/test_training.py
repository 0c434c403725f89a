"""Every technique and hybrid reproduces the single-process losses step by step.

Two launches (2 and 4 gloo processes) run all layouts one after another in the same
processes, so the suite pays the process start-up twice, not once per layout.
"""

import pytest

from tests.helpers.dist import spawn
from tests.parallel.workers import reference_losses, run_plans

TWO = {
    "dp": dict(dp=2),
    "fsdp": dict(fsdp=2),
    "tp": dict(tp=2),
    "pp-gpipe": dict(pp=2, pp_schedule="gpipe"),
    "pp-1f1b": dict(pp=2, pp_schedule="1f1b"),
    "pp-interleaved-1f1b": dict(pp=2, pp_schedule="interleaved-1f1b"),
    "cp": dict(cp=2),
}
FOUR = {
    "dp-x-tp": dict(dp=2, tp=2),
    "fsdp-x-tp": dict(fsdp=2, tp=2),
    "pp-x-dp": dict(pp=2, dp=2),
    "pp-x-tp": dict(pp=2, tp=2),
    "dp-x-cp": dict(dp=2, cp=2),
}


@pytest.fixture(scope="module")
def reference():
    return reference_losses()


@pytest.fixture(scope="module")
def two_process_losses():
    return spawn(run_plans, 2, [dict(name=k, **v) for k, v in TWO.items()])


@pytest.fixture(scope="module")
def four_process_losses():
    return spawn(run_plans, 4, [dict(name=k, **v) for k, v in FOUR.items()])


def assert_same_losses(mine, reference):
    assert len(mine) == len(reference) == 10
    for step, (a, b) in enumerate(zip(mine, reference)):
        assert abs(a - b) < 1e-4, f"step {step}: {a} vs single-process {b}"


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(TWO))
def test_two_process_layout_matches_single_process(layout, two_process_losses, reference):
    assert_same_losses(two_process_losses[layout], reference)


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(FOUR))
def test_four_process_hybrid_matches_single_process(layout, four_process_losses, reference):
    assert_same_losses(four_process_losses[layout], reference)
