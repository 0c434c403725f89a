"""`swarmlm api`: bad input is one line and exit 2; the command prints its base URL and serves."""

import os
import subprocess
import sys

import pytest

from swarmlm.cli import main


def test_a_missing_model_directory_is_one_line_and_exit_2(tmp_path, capsys):
    code = main(["api", str(tmp_path / "nope"), "--port", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("swarmlm api: error:") and "nope" in err[0]


def test_swarm_without_initial_peers_is_exit_2(ckpt, capsys):
    assert main(["api", str(ckpt), "--swarm"]) == 2
    assert "--initial-peers" in capsys.readouterr().err


def test_an_unknown_quantization_is_one_line(ckpt, capsys):
    assert main(["api", str(ckpt), "--quantize", "int3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown quantization 'int3'" in err[0]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--quantize", "int8"]], ids=["float", "int8"])
def test_the_command_prints_its_base_url_and_serves(ckpt, extra):
    from openai import OpenAI
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.Popen([sys.executable, "-m", "swarmlm", "api", str(ckpt), "--port", "0", "--api-key", "k",
                             *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        out = OpenAI(base_url=url, api_key="k", max_retries=0).completions.create(
            model=ckpt.name, prompt="the quick", max_tokens=4, temperature=0)
        assert out.usage.completion_tokens == 4
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
