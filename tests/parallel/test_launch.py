"""The torchrun entry: degrees from flags, and bad plans refused before any work starts."""

import argparse

from swarmlm.cli import main
from swarmlm.parallel.launch import plan_from_args, wants_parallel


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


def test_train_with_a_plan_bigger_than_the_world_exits_with_one_line(monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)

    code = main(["train", "--config", "tiny", "--tp", "2", "--steps", "1"])

    err = capsys.readouterr().err
    assert code == 2
    assert "needs 2 processes, but the world has 1" in err and "Traceback" not in err


def test_train_with_tp_not_dividing_kv_heads_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "4")

    code = main(["train", "--config", "tiny", "--tp", "4", "--steps", "1"])

    assert code == 2
    assert "key/value heads" in capsys.readouterr().err
