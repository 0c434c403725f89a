"""LoRA from model/lora.py: a fresh adapter changes nothing, only adapters train, bad targets are refused."""

import pytest
import torch

from swarmlm.model.config import PRESETS
from swarmlm.model.lora import LoRALinear, apply_lora, merge_lora
from swarmlm.model.transformer import Transformer


def test_fresh_lora_model_computes_the_same_and_trains_only_adapters():
    torch.manual_seed(0)
    model = Transformer(PRESETS["tiny"])
    ids = torch.randint(0, PRESETS["tiny"].vocab_size, (2, 16))
    before = model(ids)
    trainable = apply_lora(model, rank=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(ids), before)                       # B = 0
    assert {n.rsplit(".", 2)[-2] for n in trainable} == {"q_proj", "v_proj"}
    model(ids).sum().backward()
    grads = [n for n, p in model.named_parameters() if p.grad is not None]
    assert grads and all(".lora_" in n for n in grads)


def test_lora_needs_a_target_and_a_rank():
    with pytest.raises(ValueError, match="no nn.Linear"):
        apply_lora(Transformer(PRESETS["tiny"]), rank=2, targets=("nope",))
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(torch.nn.Linear(4, 4), 0, 1.0)


def test_merging_folds_the_adapters_into_the_weights():
    torch.manual_seed(0)
    model = Transformer(PRESETS["tiny"])
    ids = torch.randint(0, PRESETS["tiny"].vocab_size, (1, 8))
    trainable = apply_lora(model, rank=2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for name, p in trainable.items():
            if name.endswith("lora_b"):
                p.normal_(0, 0.1)
    with_adapters = model(ids)
    assert merge_lora(model) == 2 * PRESETS["tiny"].n_layers
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert torch.allclose(model(ids), with_adapters, atol=1e-5)
