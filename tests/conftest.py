"""Shared pytest set-up: keep torch to the machine's two cores and skip gpu tests without one."""

import os
import tempfile

import pytest
import torch

torch.set_num_threads(2)


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
