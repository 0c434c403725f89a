"""scripts/setup, run against a fake .venv whose pip only notes what it was asked: which index
torch comes from (the CPU wheel index without an NVIDIA GPU, the default one as a fallback or
with a GPU), that an installed torch is reused, and that every stage says what it does."""

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
TORCH = "torch==2.13.0"

no_gpu_here = pytest.mark.skipif(os.path.exists("/proc/driver/nvidia"),
                                 reason="this machine has an NVIDIA driver; the no-GPU branch cannot be taken")


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def repo(tmp_path):
    """A copy of the script beside a fake .venv: python imports torch once pip "installed" it;
    pip appends its arguments to pip.log and fails for the CPU index while $CPU_INDEX_DOWN is set."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup", tmp_path / "scripts" / "setup")
    venv = tmp_path / ".venv" / "bin"
    venv.mkdir(parents=True)
    mark, log = tmp_path / "torch-installed", tmp_path / "pip.log"
    _executable(venv / "python", f'#!/bin/sh\n[ -f "{mark}" ] && {{ echo 2.13.0; exit 0; }}\nexit 1\n')
    _executable(venv / "pip", f'#!/bin/sh\necho "$*" >> "{log}"\n'
                              f'case "$*" in *{CPU_INDEX}*) [ -n "$CPU_INDEX_DOWN" ] && exit 1;; esac\n'
                              f'case "$*" in *torch==*) touch "{mark}";; esac\nexit 0\n')
    (tmp_path / "bin").mkdir()
    _executable(tmp_path / "bin" / "apt-get", f'#!/bin/sh\necho "apt-get $*" >> "{tmp_path / "apt.log"}"\n')
    _executable(tmp_path / "bin" / "npm", f'#!/bin/sh\necho "$*" >> "{tmp_path / "npm.log"}"\nexit 0\n')
    return tmp_path


def run_setup(repo: Path, *, gpu: bool, cpu_index_down: bool = False,
              browser: bool = True) -> tuple[list[str], list[str]]:
    """(its stdout lines, pip's calls). A fake nvidia-smi first on PATH says whether there is a GPU;
    a fake chromium and chromedriver are there unless `browser` is False (apt-get is a fake too)."""
    _executable(repo / "bin" / "nvidia-smi", f"#!/bin/sh\nexit {0 if gpu else 1}\n")
    env = {"PATH": f"{repo / 'bin'}:/usr/bin:/bin", "HOME": str(repo)}
    if browser:
        _executable(repo / "bin" / "fake-chromium", "#!/bin/sh\n")
        _executable(repo / "bin" / "fake-chromedriver", "#!/bin/sh\n")
    env.update(SWARMLM_BROWSERS="fake-chromium", SWARMLM_BROWSER_DRIVERS="fake-chromedriver")
    if cpu_index_down:
        env["CPU_INDEX_DOWN"] = "1"
    run = subprocess.run([str(repo / "scripts" / "setup")], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    log = repo / "pip.log"
    return run.stdout.splitlines(), log.read_text().splitlines() if log.exists() else []


@no_gpu_here
def test_without_a_gpu_torch_comes_from_the_cpu_wheel_index_first(repo):
    out, pip = run_setup(repo, gpu=False)

    assert pip == [f"install -q --retries 1 --timeout 15 --index-url {CPU_INDEX} {TORCH}", "install -q -e .[test]"]
    assert out and all(line.startswith("setup: ") for line in out)
    assert any(CPU_INDEX in line and "CPU build" in line for line in out)


@no_gpu_here
def test_an_unreachable_cpu_index_falls_back_to_the_default_index(repo):
    out, pip = run_setup(repo, gpu=False, cpu_index_down=True)

    assert pip == [f"install -q --retries 1 --timeout 15 --index-url {CPU_INDEX} {TORCH}", f"install -q {TORCH}",
                   "install -q -e .[test]"]
    assert any("default index instead" in line for line in out)


def test_with_a_gpu_torch_comes_from_the_default_index(repo):
    out, pip = run_setup(repo, gpu=True)

    assert pip == [f"install -q {TORCH}", "install -q -e .[test]"]


def test_a_second_run_reuses_the_installed_torch(repo):
    run_setup(repo, gpu=False)
    (repo / "pip.log").unlink()

    out, pip = run_setup(repo, gpu=False)

    assert pip == ["install -q -e .[test]"]
    assert "setup: reusing the installed torch 2.13.0" in out


def test_the_readme_set_up_commands_are_unchanged():
    readme = (ROOT / "README.md").read_text()
    assert "    ./scripts/setup && .venv/bin/swarmlm demo\n" in readme
    assert "    ./scripts/setup && .venv/bin/python -m pytest -q\n" in readme


def test_a_missing_browser_is_installed_with_apt_get_when_root(repo):
    out, _ = run_setup(repo, gpu=False, browser=False)
    apt = (repo / "apt.log").read_text().splitlines() if (repo / "apt.log").exists() else []
    if os.getuid() == 0:
        assert apt[-1] == "apt-get install -y -q --no-install-recommends chromium chromium-driver"
        assert any("installing Chromium" in line for line in out)
    else:                             # through sudo where it is allowed without a password, else it says so
        assert any("installing Chromium" in line or "cannot install Chromium" in line for line in out)


def test_an_installed_browser_is_used(repo):
    out, _ = run_setup(repo, gpu=False)
    assert not (repo / "apt.log").exists()
    assert any("using the installed Chromium" in line for line in out)


def test_anvil_is_installed_with_npm_into_the_project(repo):
    out, _ = run_setup(repo, gpu=False)
    assert any("installing anvil" in line for line in out)
    assert "--prefix .tools @foundry-rs/anvil@" in (repo / "npm.log").read_text()
