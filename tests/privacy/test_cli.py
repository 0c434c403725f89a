"""`swarmlm fl`: bad input is one line naming the problem, exit code 2, before any peer starts."""

from __future__ import annotations

import pytest

from swarmlm.cli import main


@pytest.mark.parametrize("argv,message", [
    (["fl", "coordinate", "MISSING", "--run-id", "r", "--rounds", "1", "--clients-per-round", "2", "--out", "o"],
     "not a checkpoint directory"),
    (["fl", "coordinate", ".", "--run-id", "r", "--rounds", "1", "--clients-per-round", "2", "--out", "o",
      "--dp-noise", "1.0"], "--dp-clip and --dp-noise go together"),
    (["fl", "coordinate", ".", "--run-id", "r", "--rounds", "1", "--clients-per-round", "2", "--out", "o",
      "--min-clients", "3"], "exceeds --clients-per-round"),
    (["fl", "coordinate", ".", "--run-id", "r", "--rounds", "1", "--clients-per-round", "2", "--out", "o",
      "--secure-aggregation", "--min-clients", "1"], "needs --min-clients of 2"),
    (["fl", "coordinate", ".", "--run-id", "r", "--rounds", "1", "--clients-per-round", "2", "--out", "o",
      "--dp-sgd-clip", "1.0"], "--dp-sgd-clip and --dp-sgd-noise go together"),
    (["fl", "coordinate", ".", "--run-id", "r", "--rounds", "1", "--clients-per-round", "2", "--out", "o",
      "--dp-sgd-noise", "1.0"], "--dp-sgd-clip and --dp-sgd-noise go together"),
    (["fl", "coordinate", ".", "--run-id", "r", "--rounds", "1", "--clients-per-round", "2", "--out", "o",
      "--dp-sgd-clip", "-1", "--dp-sgd-noise", "1.0"], "--dp-sgd-clip must be positive"),
    (["fl", "coordinate", ".", "--run-id", "r", "--rounds", "1", "--clients-per-round", "2", "--out", "o",
      "--dp-sgd-clip", "0", "--dp-sgd-noise", "0"], "--dp-sgd-clip must be positive"),
    (["fl", "coordinate", ".", "--run-id", "r", "--rounds", "1", "--clients-per-round", "2", "--out", "o",
      "--dp-sgd-clip", "1", "--dp-sgd-noise", "-0.5"], "--dp-sgd-noise must be zero or positive"),
    (["fl", "join", "--run-id", "r", "--data", "/no/such/file"], "no such file"),
])
def test_bad_fl_arguments_give_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"swarmlm fl {argv[1]}: error:") and message in err and "\n" not in err
