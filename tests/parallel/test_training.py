"""Every technique and hybrid reproduces the single-process losses step by step.

Two launches (2 and 4 gloo processes, conftest.py) run all layouts one after another in the
same processes, so the suite pays the process start-up twice, not once per layout.
"""

import pytest

from tests.parallel.workers import FOUR, TWO


def assert_close_steps(mine, reference):
    assert len(mine) == len(reference)
    for step, (a, b) in enumerate(zip(mine, reference)):
        assert abs(a - b) < 1e-4, f"step {step}: {a} vs single-process {b}"


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(TWO))
def test_two_process_layout_matches_single_process(layout, two_process_run, reference):
    assert len(two_process_run[layout]) == 10
    assert_close_steps(two_process_run[layout], reference)


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(FOUR))
def test_four_process_hybrid_matches_single_process(layout, four_process_run, reference):
    assert len(four_process_run[layout]) == 10
    assert_close_steps(four_process_run[layout], reference)
