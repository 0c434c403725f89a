"""Federated runs as real processes on 127.0.0.1: secure and plain rounds agree, FedAvg comes close to
training on the union, and clients SIGKILLed in every stage leave the run going."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from swarmlm.data.corpus import open_corpus
from swarmlm.data.shards import Batches, eval_windows, prepare_tokens
from swarmlm.model.hf import load_model
from swarmlm.model.tokenizer import Tokenizer
from swarmlm.train.loop import evaluate, lm_loss
from tests.privacy.fl_procs import run_fl
from tests.privacy.fl_setup import build_model, write_shards

pytestmark = pytest.mark.slow

E, B, T, LR = 2, 8, 64, 0.3     # local steps, batch, sequence length, SGD learning rate


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fl")
    return build_model(root / "model"), write_shards(root / "data")


ROUNDS = 20


@pytest.fixture(scope="module")
def runs(setup, tmp_path_factory):
    """The same 20 rounds of FedAvg over five clients, without and with secure aggregation."""
    model, shards = setup
    root = tmp_path_factory.mktemp("fl-runs")
    args = ["--rounds", str(ROUNDS), "--clients-per-round", "5", "--min-clients", "5", "--local-steps", str(E),
            "--lr", str(LR), "--batch-size", str(B), "--seq-len", str(T), "--seed", "4"]
    return (run_fl(root / "plain", model, shards, run_id="plain", coord_args=args),
            run_fl(root / "secure", model, shards, run_id="secure", coord_args=[*args, "--secure-aggregation"]))


def test_secure_and_plain_rounds_with_the_same_seeds_give_the_same_model(setup, runs):
    model, _ = setup
    plain, secure = runs
    a, b = load_file(plain.out / "model.safetensors"), load_file(secure.out / "model.safetensors")
    assert set(a) == set(b)
    start = load_file(model / "model.safetensors")
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-2          # it did train
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4
    rounds = secure.rounds
    assert [r["round"] for r in rounds] == list(range(ROUNDS))
    assert all(r["clients"] == 5 and r["dropped"] == 0 and r["secure"] for r in rounds)
    assert all(np.isfinite(r["train_loss"]) and np.isfinite(r["val_loss"]) for r in rounds)
    assert load_model(secure.out)[1].vocab_size == load_model(model)[1].vocab_size   # an HF checkpoint


def client_tokens(model, shards):
    tok = Tokenizer.load(model)
    return [prepare_tokens(open_corpus(s), tok, progress=False) for s in shards]


def val_loss(net, tokens) -> float:
    return float(np.mean([evaluate(net, eval_windows(t.val, T, 16), 16) for t in tokens]))


def test_fedavg_comes_within_5_percent_of_one_process_trained_on_the_union(setup, runs):
    model, shards = setup
    plain, _ = runs
    tokens = client_tokens(model, shards)
    # the same number of samples in one process: ROUNDS * E steps of a batch as large as the five clients'
    central, _ = load_model(model)
    central.requires_grad_(True)
    union = Batches(np.concatenate([np.asarray(t.train) for t in tokens]), 5 * B, T, seed=0)
    opt = torch.optim.SGD(central.parameters(), lr=LR)
    central.train()
    for step in range(ROUNDS * E):
        x, y = union.get(step)
        opt.zero_grad()
        lm_loss(central, x, y).backward()
        opt.step()
    federated, _ = load_model(plain.out)
    fed_loss, central_loss = val_loss(federated, tokens), val_loss(central, tokens)
    start_loss = val_loss(load_model(model)[0], tokens)
    print(f"validation loss: start {start_loss:.4f}, federated {fed_loss:.4f}, one process on the union "
          f"{central_loss:.4f} ({fed_loss / central_loss:.3f}x)")
    assert fed_loss < start_loss - 0.5
    assert abs(fed_loss - central_loss) <= 0.05 * central_loss


def test_clients_killed_in_every_stage_leave_the_rounds_completing_over_survivors(setup, tmp_path):
    model, shards = setup
    shards = [*shards, shards[0], shards[1]]                       # seven clients
    die = {0: "setup:1", 1: "share_keys:1", 2: "collect_masked:2", 3: "unmask:2", 4: "train:3"}
    run = run_fl(tmp_path / "kills", model, shards, run_id="kills",
                 coord_args=["--rounds", "4", "--clients-per-round", "7", "--min-clients", "2", "--start-clients", "7",
                             "--local-steps", "1",
                             "--secure-aggregation", "--round-timeout", "60"],
                 client_env={i: {"SWARMLM_FL_DIE_AT": spec} for i, spec in die.items()})
    rounds = run.rounds
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    # every member is sampled in every round (K = 7). Round 1: deaths before the roster and before sharing
    # keys; round 2: one before its masked input (dropped: its masks are rebuilt from shares), one after it
    # (its input is in the sum; the others' shares unmask it); round 3: one while training
    assert [(r["sampled"], r["clients"], r["dropped"]) for r in rounds] == [(7, 5, 2), (5, 4, 1), (3, 2, 1), (2, 2, 0)]
    assert not any(r["failed_attempts"] for r in rounds)
    assert rounds[-1]["clients"] == 2 and all(r["clients"] >= 2 for r in rounds)
    for i in die:
        assert run.clients[i].proc.returncode == -9                 # each died where it was told to
    assert run.clients[5].proc.returncode == 0 and run.clients[6].proc.returncode == 0
