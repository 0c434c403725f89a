"""A test run keeps its caches in its own SWARMLM_HOME and leaves no `swarmlm-test-home-*` behind."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow         # a second pytest in a fresh interpreter

ROOT = Path(__file__).resolve().parents[2]
# pytest.main in a fresh interpreter, with a plugin that notes the home in use while the tests ran
RUN = ("import os, sys, pytest\n"
       "class Note:\n"
       "    def pytest_sessionfinish(self):\n"
       "        self.home = os.environ.get('SWARMLM_HOME', '')\n"
       "note = Note()\n"
       "rc = pytest.main(['-q', '-p', 'no:cacheprovider', 'tests/core/test_base58.py'], plugins=[note])\n"
       "print('HOME=' + note.home)\n"
       "sys.exit(rc)\n")

def test_the_run_home_is_made_in_the_temp_dir_and_removed_at_the_end(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SWARMLM_HOME"}
    env.update(TMPDIR=str(tmp_path), PYTHONPATH=str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", ""))

    run = subprocess.run([sys.executable, "-c", RUN], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    assert run.returncode == 0, run.stdout + run.stderr
    home = Path(run.stdout.strip().splitlines()[-1].removeprefix("HOME="))
    assert home.parent == tmp_path and home.name.startswith("swarmlm-test-home-")    # the run had its own
    assert not list(tmp_path.glob("swarmlm-test-home-*")), "the run left its home behind"
