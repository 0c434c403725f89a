"""`swarmlm ledger ...` and the ledger flags answer bad input with one line and exit code 2."""

from __future__ import annotations

import pytest

from swarmlm.cli import main


@pytest.mark.parametrize("argv, message", [
    (["ledger", "status", "--chain-rpc", "http://127.0.0.1:1", "--ledger", "0x" + "00" * 19 + "01"],
     "no Ethereum JSON-RPC node answers at http://127.0.0.1:1"),
    (["ledger", "deploy", "--chain-rpc", "http://127.0.0.1:1", "--slots", "9"], "--slots is 0..8"),
    (["generate", "some-model", "--prompt", "x", "--ledger", "0x" + "00" * 20], "--ledger meters swarm use"),
])
def test_bad_ledger_input_is_one_line_and_exit_code_2(argv, message, capsys, tmp_path):
    assert main([*argv, *(["--data-dir", str(tmp_path)] if argv[0] == "ledger" else [])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
