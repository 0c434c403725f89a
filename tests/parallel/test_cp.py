"""Ring attention (parallel/cp.py) against full attention, on 2 and 4 gloo processes (run inside
the shared 2- and 4-process launches, see conftest.py)."""

import pytest

from tests.parallel.workers_cp import RING_CASES


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["two_process_run", "four_process_run"])
def test_ring_attention_output_and_gradients_equal_full_attention(launch, request):
    results = request.getfixturevalue(launch)["ring"]

    for case, errs in zip(RING_CASES, results):
        for name, err in errs.items():
            assert err < 1e-5, f"{case}: {name} differs by {err}"
