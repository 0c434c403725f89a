"""Module-wide launches shared by the parallel tests: the single-process reference losses and
one 2-process run of every 2-rank layout plus the checkpoint round trip."""

import pytest

from tests.helpers.dist import spawn
from tests.parallel.workers import TWO, reference_losses, run_two_process_suite

@pytest.fixture(scope="session")
def reference():
    return reference_losses()


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("dcp") / "step5"


@pytest.fixture(scope="session")
def two_process_run(checkpoint_dir):
    return spawn(run_two_process_suite, 2, [dict(name=k, **v) for k, v in TWO.items()], str(checkpoint_dir))
