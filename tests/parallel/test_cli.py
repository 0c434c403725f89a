"""`swarmlm train` under torchrun, end to end: TP, PP-1F1B and CP against plain `swarmlm train`.

Three 2-process launches in all, typed as a user would (torchrun is `python -m
torch.distributed.run`), on a small corpus written here, plus one plain run in this process:

1. `--tp 2`: all 6 steps from scratch;
2. `--pp 2 --pp-schedule 1f1b`: the first 3 steps;
3. `--cp 2 --resume` in the pipeline's run directory: picks up its DCP checkpoint (saved under
   another layout) and trains steps 4-6.

The config holds the learning rate constant after warm-up (min_lr_ratio = 1), so the 3-step
run and the first 3 steps of the 6-step runs take the same steps. Every launch exports the
HF-format model into its run directory at the end.
"""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from swarmlm.cli import main
from swarmlm.model.hf import load_model
from tests.helpers.dist import free_port
from tests.parallel.test_training import assert_close_steps

CONFIG = """
[model]
preset = "tiny"
[train]
steps = 6
batch_size = 4
seq_len = 32
vocab_size = 300
warmup_steps = 2
min_lr_ratio = 1.0
eval_every = 100
eval_windows = 4
save_every = 0
"""
LAUNCH_TIMEOUT_S = 300


def torchrun(*args: str) -> None:
    """`torchrun --nproc-per-node 2 -m swarmlm train ARGS` on loopback; raises with its output tail
    if it fails, and kills the whole process group if it runs past the timeout."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "swarmlm", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}:\n{out[-4000:]}"


def losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"m{i}.py").write_text("".join(f"def f{j}(x):\n    return x * {j}\n" for j in range(i, i + 40)))
    (root / "run.toml").write_text(CONFIG)
    common = ["--config", str(root / "run.toml"), "--data", str(corpus), "--no-progress"]
    dirs = {name: root / name for name in ("plain", "tp", "pp")}

    assert main(["train", *common, "--out", str(dirs["plain"])]) == 0   # also fills the token cache
    torchrun(*common, "--out", str(dirs["tp"]), "--tp", "2")
    torchrun(*common, "--out", str(dirs["pp"]), "--pp", "2", "--pp-schedule", "1f1b", "--steps", "3")
    pp_losses = losses(dirs["pp"])
    torchrun(*common, "--out", str(dirs["pp"]), "--cp", "2", "--resume")
    return dict(dirs=dirs, pp_losses=pp_losses)


@pytest.mark.slow
def test_tp_under_torchrun_matches_plain_train(runs):
    assert_close_steps(losses(runs["dirs"]["tp"]), losses(runs["dirs"]["plain"]))


@pytest.mark.slow
def test_pp_1f1b_under_torchrun_matches_plain_train(runs):
    assert_close_steps(runs["pp_losses"], losses(runs["dirs"]["plain"])[:3])


@pytest.mark.slow
def test_resume_under_torchrun_continues_the_losses_exactly(runs):
    run = runs["dirs"]["pp"]
    plans = [json.loads(line)["plan"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert_close_steps(losses(run), losses(runs["dirs"]["plain"]))
    assert "pp=2" in plans[2] and "cp=2" in plans[3]   # steps 4-6 ran under CP, from the PP checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tp", "pp"])
def test_exported_model_loads_and_equals_the_plain_run(runs, name):
    plain, _ = load_model(runs["dirs"]["plain"])
    model, cfg = load_model(runs["dirs"][name])

    tokens = torch.randint(cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    assert cfg.vocab_size % 64 == 0 and (runs["dirs"][name] / "tokenizer.json").is_file()
    with torch.no_grad():
        assert torch.allclose(model(tokens), plain(tokens), atol=1e-4)
