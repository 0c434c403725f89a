"""Quantized servers: swarm generation equals local generation at the same quantization, token for
token; a client never chains servers of another quantization, and says so when only those exist."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from swarmlm.errors import NotFoundError
from swarmlm.model.generate import generate
from swarmlm.model.hf import load_config
from swarmlm.model.quant import quantize_model
from swarmlm.model.tokenizer import Tokenizer
from swarmlm.swarm.client.model import RemoteModel
from swarmlm.swarm.client.remote import ClientOptions
from swarmlm.swarm.client.session import SessionOptions
from tests.helpers.swarm_servers import FAST_CLIENT, ServerProcesses, local_model

PROMPT = [5, 17, 42, 99, 3, 250]
CLIENT = ClientOptions(connect_timeout_s=60.0, refresh_s=0.5,
                       session=SessionOptions(step_timeout_s=20.0, recovery_timeout_s=20.0, replacement_wait_s=3.0))


def _local(ckpt, scheme):
    return quantize_model(local_model(ckpt), scheme)


@pytest.mark.slow
def test_int8_and_int4_swarm_generation_equals_local_generation(tmp_path, checkpoints):
    ckpt = checkpoints["llama"]
    procs = ServerProcesses(tmp_path)
    try:
        a8 = procs.start(ckpt, blocks=(0, 2), extra_args=["--quantize", "int8"])
        others = [procs.start(ckpt, blocks=(2, 4), initial_peers=a8.maddrs, extra_args=["--quantize", "int8"],
                              wait=False)]
        others += [procs.start(ckpt, blocks=span, initial_peers=a8.maddrs, extra_args=["--quantize", "int4"],
                               wait=False) for span in ((0, 2), (2, 4))]
        for p in others:
            p.wait_ready(180.0)
        int8_servers = {a8.peer_id, others[0].peer_id}

        with RemoteModel.connect(str(ckpt), initial_peers=a8.maddrs, options=CLIENT, quantization="int8") as model:
            tokens = model.generate(PROMPT, max_new_tokens=16)
            chain = {h.peer_id for h in model.last_session.chain}
        assert tokens == generate(_local(ckpt, "int8"), PROMPT, max_new_tokens=16)
        assert chain == int8_servers                     # the int4 servers hold the same blocks, never used

        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"))
        out = subprocess.run([sys.executable, "-m", "swarmlm", "generate", str(ckpt), "--swarm", "--initial-peers",
                              *a8.maddrs, "--quantize", "int4", "--prompt", "the quick brown fox", "--temperature",
                              "0", "--max-new-tokens", "16", "--json"], capture_output=True, text=True, env=env,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        got = json.loads(out.stdout.strip().splitlines()[-1])
        # the CLI stops at the tokenizer's end-of-text token: local generation is told of it too
        eos = load_config(ckpt).eos_token_id
        eos = Tokenizer.load(ckpt).eos_id if eos is None else eos
        local = generate(_local(ckpt, "int4"), got["prompt_ids"], max_new_tokens=16, eos_id=eos)
        assert got["output_ids"] == local
        assert got["output_ids"] != generate(_local(ckpt, "int8"), got["prompt_ids"], max_new_tokens=16, eos_id=eos)
    finally:
        procs.close()


def test_a_client_refuses_to_mix_quantizations_naming_them(swarm, checkpoints):
    ckpt = checkpoints["llama"]
    swarm.add_server(ckpt, (0, 2))
    swarm.add_server(ckpt, (2, 4), quantization="int8")
    impatient = ClientOptions(connect_timeout_s=1.0, refresh_s=0.2, session=FAST_CLIENT.session)
    with pytest.raises(NotFoundError, match=r"no server holds blocks 2\.\.3 with quantization none \(they are "
                                            r"served as int8: a chain never mixes quantizations"):
        swarm.remote_model(ckpt, options=impatient)
    with pytest.raises(NotFoundError, match=r"no server holds blocks 0\.\.1 with quantization int8 .*served as none"):
        swarm.remote_model(ckpt, options=impatient, quantization="int8")


def test_in_process_quantized_swarm_matches_local(swarm, checkpoints):
    ckpt = checkpoints["gpt2"]
    swarm.add_server(ckpt, (0, 3), quantization="int4-g64")
    swarm.add_server(ckpt, (3, 4), quantization="int4-g64")
    model = swarm.remote_model(ckpt, quantization="int4-g64")
    prompts = [PROMPT, [7, 8]]
    assert model.generate(prompts, max_new_tokens=10) == generate(_local(ckpt, "int4-g64"), prompts,
                                                                  max_new_tokens=10)


def test_finetuning_over_int8_servers_gives_the_local_int8_gradients(swarm, checkpoints):
    from swarmlm.swarm.finetune import Adapters, TuneConfig, lm_loss, local_blocks

    ckpt = checkpoints["llama"]
    swarm.add_server(ckpt, (0, 2), quantization="int8")
    swarm.add_server(ckpt, (2, 4), quantization="int8")
    remote = swarm.remote_model(ckpt, quantization="int8")
    reference = _local(ckpt, "int8")
    tune = TuneConfig(prompt_len=4, deep_prompts=True, lora_rank=2)
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    grads, losses = [], []
    for local, run in ((remote.local, remote.run_blocks), (reference, local_blocks(reference))):
        adapters = Adapters(remote.cfg, tune)
        adapters.attach(local)
        with torch.no_grad():
            adapters.head_lora.lora_b.normal_(generator=torch.Generator().manual_seed(1))
            adapters.deep.normal_(std=0.1, generator=torch.Generator().manual_seed(2))
        loss = lm_loss(local, run, adapters, ids)
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append({k: p.grad for k, p in adapters.trainable().items()})
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    for name in grads[0]:
        assert grads[0][name].abs().sum() > 0
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)
