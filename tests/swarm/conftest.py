"""Fixtures for the swarm tests: tiny checkpoints (built once per run) and an in-process swarm."""

import pytest

from tests.helpers.swarm_servers import InProcessSwarm, build_checkpoint


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """family -> a tiny random checkpoint directory with 4 blocks."""
    root = tmp_path_factory.mktemp("swarm-ckpt")
    return {family: build_checkpoint(root / family, family) for family in ("gpt2", "llama")}


@pytest.fixture()
def swarm():
    s = InProcessSwarm()
    yield s
    s.close()


@pytest.fixture()
def direct_swarm():
    """The in-process swarm, with servers that also offer encrypted direct steps channels (real TCP)."""
    s = InProcessSwarm(direct=True)
    yield s
    s.close()
