"""Sessions survive a server that vanishes mid-generation, and fail clearly when nobody covers its blocks."""

import time

import pytest

from swarmlm.errors import NotFoundError
from swarmlm.model.generate import generate
from swarmlm.swarm.client.hops import HopClient
from tests.helpers.swarm_servers import local_model

PROMPT = [5, 17, 42, 99, 3, 250]


def generate_killing(swarm, model, *, after: int, victims, max_new_tokens: int = 12, prompts=None, on_kill=None):
    """Generate, killing whichever of `victims` the session uses after `after` tokens (calling
    `on_kill(session)` first); returns the tokens."""
    prompts = prompts or [PROMPT]
    rows = [[] for _ in prompts]
    for i, tokens in enumerate(model.stream_generate(prompts, max_new_tokens=max_new_tokens)):
        for row, t in zip(rows, tokens):
            if t is not None:
                row.append(t)
        if i + 1 == after:
            session = model.last_session
            if on_kill is not None:
                on_kill(session)
            used = {h.peer_id for h in session.chain}
            for peer_id in victims:
                if peer_id in used:
                    swarm.kill(peer_id)
    return rows


def test_generation_survives_a_killed_server_with_identical_tokens(swarm, checkpoints):
    ckpt = checkpoints["llama"]
    swarm.add_server(ckpt, (0, 2))
    b = swarm.add_server(ckpt, (2, 4))
    c = swarm.add_server(ckpt, (2, 4))
    model = swarm.remote_model(ckpt)

    rows = generate_killing(swarm, model, after=5, victims=[b, c])

    assert rows[0] == generate(local_model(ckpt), PROMPT, max_new_tokens=12)
    assert model.last_session.recoveries == 1
    assert all(state.channel is not None for state in model.last_session.hops)   # steps went on channels


@pytest.mark.parametrize("killed", ["first", "second"])
def test_a_killed_server_of_a_chained_session_is_replaced_with_identical_tokens(direct_swarm, checkpoints, killed):
    ckpt = checkpoints["llama"]
    spans = {"first": (0, 2), "second": (2, 4)}
    other = (2, 4) if killed == "first" else (0, 2)
    direct_swarm.add_server(ckpt, other)
    victims = [direct_swarm.add_server(ckpt, spans[killed]) for _ in range(2)]
    model = direct_swarm.remote_model(ckpt)

    chained_before = []
    rows = generate_killing(direct_swarm, model, after=5, victims=victims,
                            on_kill=lambda s: chained_before.append(s.chained_steps))

    assert rows[0] == generate(local_model(ckpt), PROMPT, max_new_tokens=12)
    session = model.last_session
    assert session.recoveries == 1
    assert all(state.channel.name.endswith("(direct)") for state in session.hops)
    # re-linked around the replacement: the steps after the failed one went chained again
    assert session.chained and all(state.pushes for state in session.hops[:-1])
    assert session.chained_steps >= chained_before[0] + 12 - 5 - 2


@pytest.mark.parametrize("killed", ["first", "second"])
def test_a_replacement_lost_during_its_replay_is_replaced_too_and_the_chain_relinked(direct_swarm, checkpoints,
                                                                                      monkeypatch, killed):
    ckpt = checkpoints["llama"]
    spans = {"first": (0, 2), "second": (2, 4)}
    direct_swarm.add_server(ckpt, (2, 4) if killed == "first" else (0, 2))
    victims = [direct_swarm.add_server(ckpt, spans[killed]) for _ in range(3)]
    model = direct_swarm.remote_model(ckpt)
    lost = []
    replay = HopClient.replay

    async def replay_losing_the_first(self, states, inputs, masks):
        if not lost:                     # the first replacement vanishes as its replay starts
            lost.append(states[0].hop.peer_id)
            await direct_swarm.vanish(lost[0])
        return await replay(self, states, inputs, masks)

    monkeypatch.setattr(HopClient, "replay", replay_losing_the_first)
    chained_before = []
    rows = generate_killing(direct_swarm, model, after=5, victims=victims,
                            on_kill=lambda s: chained_before.append(s.chained_steps))

    assert rows[0] == generate(local_model(ckpt), PROMPT, max_new_tokens=12)
    session = model.last_session
    assert lost and lost[0] not in {h.peer_id for h in session.chain}
    assert session.recoveries == 1 and session.hops[0].pushes   # into, or as, the second replacement
    assert session.chained_steps >= chained_before[0] + 12 - 5 - 2


@pytest.mark.parametrize("kind", ["swarm", "direct_swarm"])
def test_a_lost_server_may_be_replaced_by_two_smaller_ones(kind, request, checkpoints):
    swarm = request.getfixturevalue(kind)
    ckpt = checkpoints["gpt2"]
    swarm.add_server(ckpt, (0, 1))
    whole = swarm.add_server(ckpt, (1, 4))
    model = swarm.remote_model(ckpt)
    batch = [[5, 17, 42], [7, 8, 9, 10, 11, 12, 13], [300]]
    rows = []
    for i, tokens in enumerate(model.stream_generate(batch, max_new_tokens=10)):
        rows.append(tokens)
        if i == 1:                           # the session runs on `whole`; now smaller servers join
            swarm.add_server(ckpt, (1, 3))
            swarm.add_server(ckpt, (3, 4))
        if i == 3:
            chained_before = model.last_session.chained_steps
            swarm.kill(whole)
    got = [[t[r] for t in rows if t[r] is not None] for r in range(3)]

    assert got == generate(local_model(ckpt), batch, max_new_tokens=10)
    session = model.last_session
    assert session.recoveries == 1 and len(session.chain) == 3
    if kind == "direct_swarm":           # the three re-chained: the two new ones, and the first into them
        assert all(state.pushes for state in session.hops[:-1])
        assert session.chained_steps >= chained_before + 10 - 4 - 2


def test_no_replacement_fails_naming_the_missing_blocks(swarm, checkpoints):
    ckpt = checkpoints["llama"]
    swarm.add_server(ckpt, (0, 2))
    b = swarm.add_server(ckpt, (2, 4))
    model = swarm.remote_model(ckpt)
    t0 = time.monotonic()

    with pytest.raises(NotFoundError, match=r"blocks 2\.\.3"):
        generate_killing(swarm, model, after=3, victims=[b])

    assert time.monotonic() - t0 < 30


def test_a_server_stopped_cleanly_is_left_at_once(swarm, checkpoints):
    ckpt = checkpoints["llama"]
    swarm.add_server(ckpt, (0, 4))
    a = swarm.add_server(ckpt, (0, 4))
    model = swarm.remote_model(ckpt)
    swarm.stop_server(a)

    out = model.generate(PROMPT, max_new_tokens=6)

    assert out == generate(local_model(ckpt), PROMPT, max_new_tokens=6)
