"""Greedy generation through servers holding spans equals local generation."""

import dataclasses
import pytest

from swarmlm.model.generate import generate
from tests.helpers.swarm_servers import local_model

PROMPT = [5, 17, 42, 99, 3, 250]
BATCH = [[5, 17, 42], [7, 8, 9, 10, 11, 12, 13], [300]]


def two_halves(swarm, ckpt):
    """Two servers holding blocks 0:2 and 2:4 of `ckpt`, and a client model over them."""
    swarm.add_server(ckpt, (0, 2))
    swarm.add_server(ckpt, (2, 4))
    return swarm.remote_model(ckpt)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_two_half_servers_generate_like_local(swarm, checkpoints, family):
    ckpt = checkpoints[family]
    model = two_halves(swarm, ckpt)

    out = model.generate(PROMPT, max_new_tokens=12)

    assert out == generate(local_model(ckpt), PROMPT, max_new_tokens=12)


def test_one_server_with_every_block_generates_like_local(swarm, checkpoints):
    ckpt = checkpoints["llama"]
    swarm.add_server(ckpt, (0, 4))
    model = swarm.remote_model(ckpt)

    out = model.generate(PROMPT, max_new_tokens=12)

    assert out == generate(local_model(ckpt), PROMPT, max_new_tokens=12)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_batch_of_prompts_of_different_lengths_generates_like_local(swarm, checkpoints, family):
    ckpt = checkpoints[family]
    model = two_halves(swarm, ckpt)

    out = model.generate(BATCH, max_new_tokens=10)

    assert out == generate(local_model(ckpt), BATCH, max_new_tokens=10)


def test_servers_without_a_steps_channel_are_stepped_by_unary_calls(swarm, checkpoints, monkeypatch):
    from swarmlm.p2p.memory import MemoryPeer

    async def no_raw_streams(self, name, handler):
        return None                          # an older server: no steps channel
    monkeypatch.setattr(MemoryPeer, "add_raw_stream_handler", no_raw_streams)
    ckpt = checkpoints["llama"]
    model = two_halves(swarm, ckpt)

    out = model.generate(PROMPT, max_new_tokens=12)

    assert out == generate(local_model(ckpt), PROMPT, max_new_tokens=12)
    assert all(state.channel is None for state in model.last_session.hops)


def test_direct_steps_channels_generate_like_local(direct_swarm, checkpoints):
    ckpt = checkpoints["llama"]
    model = two_halves(direct_swarm, ckpt)

    out = model.generate(BATCH, max_new_tokens=10)

    assert out == generate(local_model(ckpt), BATCH, max_new_tokens=10)
    session = model.last_session
    assert all(state.channel.name.endswith("(direct)") for state in session.hops)
    assert session.chained and session.hops[0].pushes                # the first server pushed to the second


def test_a_server_whose_push_did_not_leave_is_relayed_by_the_client(direct_swarm, checkpoints, monkeypatch):
    from swarmlm.swarm.server import chain
    monkeypatch.setattr(chain.NextLink, "push", lambda self, position, hidden: False)   # a link broken after open
    ckpt = checkpoints["llama"]
    model = two_halves(direct_swarm, ckpt)

    out = model.generate(PROMPT, max_new_tokens=12)

    assert out == generate(local_model(ckpt), PROMPT, max_new_tokens=12)
    assert model.last_session.chained and model.last_session.recoveries == 0


def test_a_server_that_cannot_be_dialed_is_stepped_over_libp2p(direct_swarm, checkpoints, monkeypatch):
    from swarmlm.errors import PeerError
    from swarmlm.p2p.channel.service import SideChannel

    async def unreachable(self, host, port, *args, **kwargs):
        raise PeerError(f"side channel {host}:{port}: connection refused")   # a firewall in between
    monkeypatch.setattr(SideChannel, "_dial", unreachable)
    ckpt = checkpoints["llama"]
    direct_swarm.add_server(ckpt, (0, 4))
    model = direct_swarm.remote_model(ckpt)

    out = model.generate(PROMPT, max_new_tokens=12)

    assert out == generate(local_model(ckpt), PROMPT, max_new_tokens=12)
    assert [state.channel.name for state in model.last_session.hops] == ["swarm/steps"]


def test_steps_sent_ahead_to_the_later_hops_are_used_or_called_off(direct_swarm, checkpoints):
    import torch

    ckpt = checkpoints["llama"]
    model = two_halves(direct_swarm, ckpt)
    options = model.blocks.options                    # the slow chained path: no fast lane (test_fast.py)
    model.blocks.options = dataclasses.replace(options, session=dataclasses.replace(options.session, fast=False))
    local = local_model(ckpt)
    h = torch.randn(1, 5, local.cfg.dim, generator=torch.Generator().manual_seed(0))
    session = model.inference_session(batch=1, max_length=16).session
    called_off = []
    chained = session._chained
    real_call_off = chained.call_off

    async def call_off(states, tasks, position):
        called_off.append(position)
        await real_call_off(states, tasks, position)
    chained.call_off = call_off

    out = [model.runner.run(session.step(h[:, :3], more=True))]
    assert chained.ahead is not None and chained.ahead[0] == 3      # waiting at the second server
    out.append(model.runner.run(session.step(h[:, 3:4], more=True)))   # uses it
    assert called_off == []
    out.append(model.runner.run(session.step(h[:, 4:5], torch.ones(1, 1, dtype=torch.bool))))  # cannot use it
    assert called_off == [4] and chained.ahead is None
    assert session.chained and session.recoveries == 0

    from swarmlm.model.cache import KVCache
    cache = KVCache.empty(local.cfg, 1, 16)
    with torch.inference_mode():
        want = [local.run_blocks(h[:, :3], cache=cache), local.run_blocks(h[:, 3:4], cache=cache),
                local.run_blocks(h[:, 4:5], cache=cache, key_mask=torch.ones(1, 1, dtype=torch.bool))]
    torch.testing.assert_close(torch.cat(out, dim=1), torch.cat(want, dim=1), atol=1e-6, rtol=1e-6)
    model.runner.run(session.close())
