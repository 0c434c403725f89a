"""The torchrun entry: degrees from flags, and bad plans refused before any work starts."""

import argparse

import pytest

from swarmlm.cli import main
from swarmlm.parallel.launch import keep_metrics_up_to, plan_from_args, wants_parallel


def args(**kw):
    base = dict(dp=None, fsdp=None, tp=None, pp=None, cp=None, pp_schedule="1f1b", microbatches=0)
    return argparse.Namespace(**{**base, **kw})


def test_no_degrees_make_every_process_a_dp_replica():
    assert plan_from_args(args(), 4).dp == 4


def test_given_degrees_leave_the_rest_at_one():
    plan = plan_from_args(args(tp=2, pp=2, pp_schedule="gpipe"), 4)
    assert (plan.dp, plan.tp, plan.pp, plan.pp_schedule) == (1, 2, 2, "gpipe")


def test_any_degree_above_one_goes_parallel(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert wants_parallel(args(cp=2)) and not wants_parallel(args())


def test_resumed_run_drops_metric_lines_after_its_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(f'{{"step": {s}, "loss": 1.0}}\n' for s in range(1, 6)))

    keep_metrics_up_to(path, 3)

    assert [line[:10] for line in path.read_text().splitlines()] == ['{"step": 1', '{"step": 2', '{"step": 3']


BAD_PLANS = [
    (["--tp", "3"], "--tp 3 does not divide the model's 4 attention heads"),
    (["--tp", "4"], "key/value heads"),
    (["--tp", "0"], "--tp must be a positive integer, got 0"),
    (["--pp", "8"], "8 pipeline stages"),
    (["--pp", "2", "--microbatches", "3"], "do not split into 3 micro-batches"),
    (["--cp", "3"], "cannot split a sequence of 32 tokens into 3"),
    (["--dp", "2", "--tp", "2"], "needs 4 processes, but the world has 1"),
]


@pytest.mark.parametrize("flags, message", BAD_PLANS)
def test_bad_plan_is_one_line_exit_2_and_nothing_runs(flags, message, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "run"

    code = main(["train", "--config", "tiny", "--steps", "1", "--seq-len", "32", "--out", str(out), *flags])

    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()   # refused before any process group, data or run directory
