"""The demo's summary: the step count and losses from metrics.jsonl, and a verdict that fails
(exit code 1, said plainly) when the swarm's tokens are not local greedy decoding's."""

import json

from swarmlm.demo.summary import Generation, Training, report

LOCAL = [11, 12, 13, 14, 15, 16, 17, 18]


def metrics(n_steps: int) -> list[dict]:
    """What a swarm trainer writes: one record per step, then a final one with the validation loss."""
    steps = [{"step": i, "loss": 8.0 - i / 100, "peers": 2} for i in range(1, n_steps + 1)]
    return steps + [{"step": n_steps, "loss": steps[-1]["loss"], "val_loss": 7.25, "final": True}]


def generation(swarm_tokens, recoveries=1) -> Generation:
    return Generation(prompt_ids=[1, 2, 3], swarm_tokens=swarm_tokens, local_tokens=LOCAL, seconds=2.0,
                      recoveries=recoveries, killed="12D3KooWKilledServer", chained_steps=7, relinked=True)


def run_report(gen, tmp_path, capsys, n_steps=200):
    code = report(swarm="1 bootstrap", model="tiny", n_params=450_000, training=Training.from_metrics(metrics(n_steps)),
                  gen=gen, path=tmp_path / "summary.json")
    return code, capsys.readouterr().out, json.loads((tmp_path / "summary.json").read_text())


def test_the_final_record_is_not_counted_as_a_step():
    t = Training.from_metrics(metrics(200))
    assert t.steps == 200 and t.first_loss == 7.99 and t.last_loss == 6.0 and t.val_loss == 7.25


def test_a_matching_run_reports_both_losses_labelled_and_warns_of_gibberish(tmp_path, capsys):
    code, out, written = run_report(generation(list(LOCAL)), tmp_path, capsys)

    assert code == 0
    assert "training    200 steps; training loss 7.990 → 6.000 (first → last step); validation loss 7.250" in out
    assert "tiny model (0.45M parameters) trained for 200 steps: expect gibberish" in out
    assert "output identical to local greedy: yes" in out and "FAILED" not in out
    assert written["generation"]["swarm_tokens"] == written["generation"]["local_tokens"] == LOCAL
    assert written["training"]["steps"] == 200 and written["problems"] == []


def test_one_token_off_local_greedy_fails_the_demo_and_says_where(tmp_path, capsys):
    perturbed = LOCAL[:5] + [LOCAL[5] + 1] + LOCAL[6:]

    code, out, written = run_report(generation(perturbed), tmp_path, capsys)

    assert code != 0
    assert "output identical to local greedy: NO" in out
    assert "FAILED: the swarm's tokens differ from local greedy decoding at token 5" in out
    assert written["generation"]["swarm_tokens"] == perturbed and written["problems"]


def test_a_shorter_output_fails_too(tmp_path, capsys):
    code, out, _ = run_report(generation(LOCAL[:-1]), tmp_path, capsys)
    assert code != 0 and "at token 7: the swarm gave nothing (ended)" in out


def test_no_failover_fails_the_demo(tmp_path, capsys):
    code, out, _ = run_report(generation(list(LOCAL), recoveries=0), tmp_path, capsys)
    assert code != 0 and "FAILED: the client made no failover" in out
