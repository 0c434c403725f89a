"""Ring attention (parallel/cp.py) against full attention, on 2 and 4 gloo processes."""

import pytest

from tests.helpers.dist import spawn
from tests.parallel.workers_cp import ring_vs_full

CASES = [
    dict(B=2, H=4, Hkv=4, T=16, Dh=8, causal=True, seed=0),
    dict(B=2, H=4, Hkv=2, T=16, Dh=8, causal=True, seed=1),   # grouped-query heads
    dict(B=1, H=2, Hkv=2, T=8, Dh=4, causal=False, seed=2),
]


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_ring_attention_output_and_gradients_equal_full_attention(world):
    results = spawn(ring_vs_full, world, CASES)

    for case, errs in zip(CASES, results):
        for name, err in errs.items():
            assert err < 1e-5, f"{case}: {name} differs by {err}"
