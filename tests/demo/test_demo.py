import json

import pytest

from swarmlm.cli import main


def test_demo_rejects_bad_counts(capsys):
    assert main(["demo", "--peers", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_trains_serves_survives_a_killed_server_and_matches_local(tmp_path, capsys):
    from swarmlm.demo.swarm import NEW_TOKENS, PROMPT
    from swarmlm.model.generate import generate
    from swarmlm.model.hf import load_model
    from swarmlm.model.tokenizer import Tokenizer

    code = main(["demo", "--peers", "2", "--steps", "8", "--out", str(tmp_path)])
    out = capsys.readouterr().out

    assert code == 0, out
    assert "recoveries  1" in out and "re-linked after the failover: yes" in out
    assert "identical to local greedy: yes" in out
    assert "manifest baguqeera" in out
    # the step count and losses, labelled: the trainer's final (validation) record is not a step
    steps = [json.loads(ln) for ln in (tmp_path / "trainer0" / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in steps if not r.get("final")]) == 8
    assert "training    8 steps; training loss " in out and "validation loss " in out and "expect gibberish" in out
    # the swarm's tokens against greedy decoding of the published checkpoint, recomputed here
    summary = json.loads((tmp_path / "summary.json").read_text())
    tok = Tokenizer.load(tmp_path / "trainer0")
    model, _ = load_model(tmp_path / "trainer0")
    local = generate(model, tok.encode(PROMPT), max_new_tokens=NEW_TOKENS, temperature=0.0, eos_id=tok.eos_id)
    assert summary["generation"]["prompt_ids"] == tok.encode(PROMPT)
    assert summary["generation"]["swarm_tokens"] == local and len(local) > 0
    assert summary["training"]["steps"] == 8 and summary["problems"] == []
    # the ledger: every server earned credit for what it served; the request past the quota was refused
    assert all(c > 0 for c in summary["ledger"]["credit"].values()) and len(summary["ledger"]["credit"]) == 3
    assert "quota exceeded" in summary["ledger"]["refused"] and "refused     " in out
    # one federated round over secure aggregation, with the accountant's epsilon
    assert summary["federated"]["clients"] == 3 and summary["federated"]["secure"] is True
    assert summary["federated"]["epsilon"] > 0 and "DP ε = " in out
    # private generation: the parties' tokens are local greedy decoding's
    assert summary["private"]["tokens"] == local[:len(summary["private"]["tokens"])] and summary["private"]["equal"]
    assert summary["private"]["rounds"] > 0 and summary["private"]["bytes"] > 0
