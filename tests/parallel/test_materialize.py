"""Meta-device build: a rank holds only its pieces, and they start from the single-process weights."""

import torch

from swarmlm.model.config import PRESETS
from swarmlm.model.transformer import Transformer
from swarmlm.parallel.engine import ParallelTrainer
from swarmlm.parallel.materialize import build_shell
from swarmlm.train.config import TrainConfig

TINY = PRESETS["tiny"].replace(vocab_size=512)
GPT2 = TINY.replace(family="gpt2", architecture="GPT2LMHeadModel", n_kv_heads=4, attn_bias=True,
                    attn_out_bias=True, mlp_bias=True, tie_embeddings=False)


def test_shell_has_no_storage():
    shell = build_shell(TINY)

    assert all(p.is_meta for p in shell.parameters())


def test_materialized_weights_and_generator_equal_a_seeded_build():
    for cfg in (TINY, GPT2):
        torch.manual_seed(7)
        ref = Transformer(cfg)
        ref_next = torch.rand(4)

        model = ParallelTrainer(cfg, TrainConfig(seed=7)).modules[0]
        mine_next = torch.rand(4)

        mine, theirs = model.state_dict(), ref.state_dict()
        assert mine.keys() == theirs.keys()
        for name in theirs:
            assert torch.equal(mine[name], theirs[name]), f"{cfg.family}: {name}"
        assert torch.equal(mine_next, ref_next)   # the generator is where a real build leaves it
        assert (model.output.weight is model.tok_embeddings.weight) == cfg.tie_embeddings
