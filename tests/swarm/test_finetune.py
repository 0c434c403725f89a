"""Fine-tuning through the swarm: the same gradients as locally, and a falling loss."""

import pytest
import torch

from swarmlm.swarm.finetune import Adapters, TuneConfig, finetune, lm_loss, local_blocks
from tests.helpers.swarm_servers import local_model


def grads_of(local, run_blocks, adapters, ids):
    adapters.attach(local)
    params = adapters.trainable()
    for p in params.values():
        p.grad = None
    loss = lm_loss(local, run_blocks, adapters, ids)
    loss.backward()
    return float(loss.detach()), {k: p.grad.clone() for k, p in params.items()}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_one_step_through_the_swarm_gives_the_local_gradients(swarm, checkpoints, family):
    ckpt = checkpoints[family]
    swarm.add_server(ckpt, (0, 2))
    swarm.add_server(ckpt, (2, 4))
    remote = swarm.remote_model(ckpt)
    reference = local_model(ckpt)
    tune = TuneConfig(prompt_len=4, deep_prompts=True, lora_rank=4)
    ids = torch.randint(0, 320, (3, 16), generator=torch.Generator().manual_seed(0))
    swarm_adapters, local_adapters = Adapters(remote.cfg, tune), Adapters(remote.cfg, tune)
    with torch.no_grad():      # LoRA's B starts at zero; make it non-zero so A gets a gradient too
        for a in (swarm_adapters, local_adapters):
            a.attach(remote.local if a is swarm_adapters else reference)
            a.head_lora.lora_b.copy_(torch.randn(a.head_lora.lora_b.shape, generator=torch.Generator().manual_seed(1)))
            a.deep.copy_(0.1 * torch.randn(a.deep.shape, generator=torch.Generator().manual_seed(2)))

    loss_s, grads_s = grads_of(remote.local, remote.run_blocks, swarm_adapters, ids)
    loss_l, grads_l = grads_of(reference, local_blocks(reference), local_adapters, ids)

    assert loss_s == pytest.approx(loss_l, abs=1e-5)
    assert set(grads_s) == {"prompts", "deep_prompts", "head.lora_a", "head.lora_b"}
    for name in grads_s:
        torch.testing.assert_close(grads_s[name], grads_l[name], atol=1e-5, rtol=1e-4, msg=name)


def test_thirty_steps_through_the_swarm_lower_the_loss(swarm, checkpoints):
    ckpt = checkpoints["llama"]
    swarm.add_server(ckpt, (0, 2))
    swarm.add_server(ckpt, (2, 4))
    remote = swarm.remote_model(ckpt)
    text = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8] * 40)     # a small, very regular text
    adapters = Adapters(remote.cfg, TuneConfig(prompt_len=4, lora_rank=4, steps=30, batch_size=4, seq_len=16,
                                               lr=3e-2))

    losses = finetune(remote.local, remote.run_blocks, adapters, text)

    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
