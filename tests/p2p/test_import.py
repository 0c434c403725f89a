"""Importing Peer leaves hivemind's averager and optimizer (and scipy) unimported, yet hivemind's names work."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow        # a fresh interpreter importing torch


def test_peer_imports_without_hiveminds_averager_and_its_names_still_resolve():
    code = ("import sys, swarmlm.p2p.peer\n"
            "light = 'hivemind.averaging' not in sys.modules and 'scipy' not in sys.modules\n"
            "import hivemind\n"
            "print(light, hivemind.DHT.__name__, 'hivemind.averaging' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "DHT", "True"]
