"""Save under TP=2, resume under DP=2 and under one process; export to the HF format."""

import pytest
import torch

from swarmlm.model.hf import load_model
from swarmlm.parallel.checkpoint import export_hf, load_checkpoint
from swarmlm.parallel.engine import ParallelTrainer
from tests.parallel.test_training import assert_close_steps
from tests.parallel.workers import TRAIN, batch, model_config


@pytest.mark.slow
def test_resume_under_dp_continues_as_if_uninterrupted(two_process_run, reference):
    run = two_process_run["checkpoint"]

    assert_close_steps(run["tp"], reference[:5])
    assert_close_steps(run["dp"], reference[5:])


@pytest.mark.slow
def test_resume_in_one_process_continues_as_if_uninterrupted(two_process_run, checkpoint_dir, reference):
    cfg = model_config()
    trainer = ParallelTrainer(cfg, TRAIN)

    start = load_checkpoint(trainer, checkpoint_dir)
    losses = [trainer.step(s, *batch(s, cfg)) for s in range(start, 10)]

    assert start == 5
    assert_close_steps(losses, reference[5:])


@pytest.mark.slow
def test_export_to_hf_gives_the_checkpointed_model(two_process_run, checkpoint_dir, tmp_path):
    cfg = model_config()
    trainer = ParallelTrainer(cfg, TRAIN)
    load_checkpoint(trainer, checkpoint_dir)

    export_hf(cfg, checkpoint_dir, tmp_path / "hf")
    exported, exported_cfg = load_model(tmp_path / "hf")

    tokens, _ = batch(0, cfg)
    assert exported_cfg.n_layers == cfg.n_layers
    with torch.no_grad():
        assert torch.allclose(exported(tokens), trainer.modules[0](tokens), atol=1e-5)
