from swarmlm.cli import main


def test_swarm_training_without_a_run_id_is_a_one_line_error(capsys):
    assert main(["train", "--swarm"]) == 2
    err = capsys.readouterr().err
    assert "--run-id" in err and "Traceback" not in err


def test_negative_diloco_is_a_one_line_error(capsys):
    assert main(["train", "--swarm", "--run-id", "x", "--diloco", "-1"]) == 2
    assert "--diloco" in capsys.readouterr().err
