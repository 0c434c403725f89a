"""Shared pytest set-up: keep torch to the machine's two cores and skip gpu tests without one."""

import os
import tempfile

import pytest
import torch

# One thread per process: tests run several processes on 2 cores, and OpenMP threads that
# spin-wait for a busy core make every op 5-10x slower. Children inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


def pytest_configure(config):
    # caches (token shards, tokenizers) and peer identities go to a per-run folder, never to ~
    if "SWARMLM_HOME" not in os.environ:
        os.environ["SWARMLM_HOME"] = tempfile.mkdtemp(prefix="swarmlm-test-home-")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an accelerator")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_swarmlm_logging():
    """CLI tests call `main`, which sets swarmlm's log level and handler; undo it after each test so
    the next one's caplog sees what it expects."""
    import logging
    names = ("swarmlm", "swarmlm.swarm")
    saved = {n: (logging.getLogger(n).level, list(logging.getLogger(n).handlers)) for n in names}
    yield
    for n, (level, handlers) in saved.items():
        logger = logging.getLogger(n)
        logger.setLevel(level)
        logger.handlers[:] = handlers
