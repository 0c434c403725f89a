"""Launches shared by the parallel tests: the single-process reference losses, one 2-process run
of every 2-rank layout plus the checkpoint round trip and ring attention, and one 4-process run
of every hybrid plus ring attention."""

import pytest

from tests.helpers.dist import spawn
from tests.parallel.workers import (
    FOUR,
    TWO,
    reference_losses,
    run_four_process_suite,
    run_two_process_suite,
)


@pytest.fixture(scope="session")
def reference():
    return reference_losses()


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("dcp") / "step5"


@pytest.fixture(scope="session")
def two_process_run(checkpoint_dir):
    return spawn(run_two_process_suite, 2, [dict(name=k, **v) for k, v in TWO.items()], str(checkpoint_dir))


@pytest.fixture(scope="session")
def four_process_run():
    return spawn(run_four_process_suite, 4, [dict(name=k, **v) for k, v in FOUR.items()])
