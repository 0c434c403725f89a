"""Shared pytest set-up: keep torch to the machine's two cores, give the run its own SWARMLM_HOME (removed
at the end), and skip gpu tests without one."""

import os
import shutil
import tempfile

import pytest
import torch

# One thread per process: tests run several processes on 2 cores, and OpenMP threads that
# spin-wait for a busy core make every op 5-10x slower. Children inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


_made_home: str | None = None       # the per-run SWARMLM_HOME this run made, removed at its end


def pytest_configure(config):
    # caches (token shards, tokenizers) and peer identities go to a per-run folder, never to ~
    global _made_home
    if "SWARMLM_HOME" not in os.environ:
        _made_home = os.environ["SWARMLM_HOME"] = tempfile.mkdtemp(prefix="swarmlm-test-home-")
    # tests start servers and clients on threads of this process, which may build the kernels
    # while this thread imports: import their build tooling first (see qkernels.prepare)
    from swarmlm.model import qkernels
    qkernels.prepare()


def pytest_unconfigure(config):
    global _made_home
    if _made_home is not None:
        shutil.rmtree(_made_home, ignore_errors=True)
        if os.environ.get("SWARMLM_HOME") == _made_home:
            del os.environ["SWARMLM_HOME"]
        _made_home = None


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
