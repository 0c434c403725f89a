import pytest

from swarmlm.cli import main


def test_demo_rejects_bad_counts(capsys):
    assert main(["demo", "--peers", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_trains_serves_survives_a_killed_server_and_matches_local(tmp_path, capsys):
    code = main(["demo", "--peers", "2", "--steps", "8", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "recoveries  1" in out and "identical to local greedy: yes" in out
    assert "re-linked after the failover: yes" in out
    assert "manifest baguqeera" in out
