"""Sessions survive a server that vanishes mid-generation, and fail clearly when nobody covers its blocks.

The decode loop runs up to two steps ahead of the tokens the test reads, so which step meets the
killed server depends on timing: the tests check the session's own record of its steps
(`step_log`) and of its states (`history`), not counts taken when the kill was ordered.
"""

import time

import pytest

from swarmlm.errors import NotFoundError
from swarmlm.model.generate import generate
from swarmlm.swarm import fast, wire
from swarmlm.swarm.client.hops import HopClient
from swarmlm.swarm.client.remote import RemoteBlocks
from swarmlm.swarm.client.states import SessionState, StepMode
from swarmlm.swarm.server.fast import FastLane
from swarmlm.swarm.server.host import BlockHost
from tests.helpers.swarm_servers import local_model

S = SessionState

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


def failed_over_once(session, *, every_other: StepMode) -> bool:
    """Exactly one step met the failure, and every other step, before and after it, went `every_other`."""
    modes = [r.mode for r in session.step_log]
    return modes.count(StepMode.FAILED_OVER) == 1 and all(
        m is every_other for m in modes if m is not StepMode.FAILED_OVER)


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

    rows = generate_killing(direct_swarm, model, after=5, victims=victims)

    assert rows[0] == generate(local_model(ckpt), PROMPT, max_new_tokens=12)
    session = model.last_session
    assert session.recoveries == 1
    assert all(state.channel.name.endswith("(direct)") for state in session.hops)
    # re-linked around the replacement: every step but the one that met the failure went chained
    assert session.chained and all(state.pushes for state in session.hops[:-1])
    assert failed_over_once(session, every_other=StepMode.CHAINED) and session.chained_steps == 12 - 1
    assert session.history == [S.OPENING, S.CHAINED, S.RECOVERING, S.REPLAYING, S.RELINKING, S.CHAINED, S.CLOSED]


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
    rows = generate_killing(direct_swarm, model, after=5, victims=victims)

    assert rows[0] == generate(local_model(ckpt), PROMPT, max_new_tokens=12)
    session = model.last_session
    assert lost and lost[0] not in {h.peer_id for h in session.chain}
    assert session.recoveries == 1 and session.hops[0].pushes   # into, or as, the second replacement
    assert session.history == [S.OPENING, S.CHAINED, S.RECOVERING, S.REPLAYING, S.RECOVERING, S.REPLAYING,
                               S.RELINKING, S.CHAINED, S.CLOSED]
    # however far the decode loop had run ahead when the kill came: only the step that met it went
    # hop by hop, and every step once the chain was re-linked went chained again
    assert failed_over_once(session, every_other=StepMode.CHAINED) and session.chained_steps == 12 - 1


def count_deliveries(monkeypatch):
    """Every input delivered into a waiting step at any server, as (session id, position, by): `by` is
    "server" for a push from the server before it, "client" for the client's own (its relay of an
    output whose push did not leave). Patched before the servers start: they bind their handlers then."""
    delivered, from_client = [], set()
    rpc_step, deliver = BlockHost.rpc_step, BlockHost._deliver

    async def counted_rpc_step(self, peer_id, req):
        if req.pushed:
            from_client.add(id(req))
        return await rpc_step(self, peer_id, req)

    async def counted_deliver(self, session, req):
        if req.hidden is not None:           # not a call-off
            delivered.append((req.session_id, req.position, "client" if id(req) in from_client else "server"))
        return await deliver(self, session, req)

    on_push = FastLane.on_push

    def counted_on_push(self, conn, key):          # the fast lane's pushes (swarm/fast.py)
        handle = on_push(self, conn, key)

        def spy(plain):
            if plain is not None and fast.is_fast(plain):
                kind, _, session_id, position, _ = fast.parse(plain)
                if kind == fast.PUSH:
                    delivered.append((session_id, position, "server"))
            return handle(plain)
        return spy

    monkeypatch.setattr(BlockHost, "rpc_step", counted_rpc_step)
    monkeypatch.setattr(BlockHost, "_deliver", counted_deliver)
    monkeypatch.setattr(FastLane, "on_push", counted_on_push)
    return delivered


def test_after_a_failover_the_server_before_the_replacement_pushes_into_it(direct_swarm, checkpoints, monkeypatch):
    delivered = count_deliveries(monkeypatch)
    relayed = []                             # the client delivering a hop's input itself
    deliver = HopClient.deliver

    async def counted_client_deliver(self, state, position, hidden):
        if hidden is not None:
            relayed.append((state.session_id, position))
        return await deliver(self, state, position, hidden)

    monkeypatch.setattr(HopClient, "deliver", counted_client_deliver)
    ckpt = checkpoints["llama"]
    direct_swarm.add_server(ckpt, (0, 2))
    victims = [direct_swarm.add_server(ckpt, (2, 4)) for _ in range(2)]
    model = direct_swarm.remote_model(ckpt)

    rows = generate_killing(direct_swarm, model, after=5, victims=victims)

    assert rows[0] == generate(local_model(ckpt), PROMPT, max_new_tokens=12)
    session = model.last_session
    failed = [r.position for r in session.step_log if r.mode is StepMode.FAILED_OVER]
    later = [r.position for r in session.step_log if r.position > failed[0]]
    assert len(failed) == 1 and later    # the second hop was replaced, and steps followed
    replacement = session.hops[1].session_id
    into_replacement = [(position, by) for sid, position, by in delivered if sid == replacement]
    # each later step's input reached the replacement by a push from the first server, never by the
    # client (which is what happens, with the same tokens, if the first server still pushes to the dead one)
    assert into_replacement == [(position, "server") for position in later]
    assert [position for sid, position in relayed if sid == replacement] == []
    assert session.fast_steps > 0 and session.hops[1].lane.relayed == 0     # by the fast lane, pushed


def test_a_killed_server_is_never_offered_a_session_again(swarm, checkpoints, monkeypatch):
    opens = []                               # the peer of every session the client asked for, in order
    call = RemoteBlocks.call

    async def counted_call(self, peer_id, name, request, reply_cls, *, timeout_s):
        if name == wire.RPC_OPEN:
            opens.append(peer_id)
        return await call(self, peer_id, name, request, reply_cls, timeout_s=timeout_s)

    monkeypatch.setattr(RemoteBlocks, "call", counted_call)
    ckpt = checkpoints["llama"]
    swarm.add_server(ckpt, (0, 2))
    victim = swarm.add_server(ckpt, (2, 4))
    far = swarm.add_server(ckpt, (2, 4))
    model = swarm.remote_model(ckpt)
    model.blocks.rtt_s[far] = 1.0            # the router prefers the victim whenever it may use it
    opened_before_kill = []

    rows = generate_killing(swarm, model, after=5, victims=[victim],
                            on_kill=lambda s: opened_before_kill.append(len(opens)))

    assert rows[0] == generate(local_model(ckpt), PROMPT, max_new_tokens=12)
    assert model.last_session.recoveries == 1 and victim not in {h.peer_id for h in model.last_session.chain}
    assert victim in opens[:opened_before_kill[0]]
    assert victim not in opens[opened_before_kill[0]:] and far in opens[opened_before_kill[0]:]
    # and the next session of the same client does not try it first: it stays avoided until it answers
    after_first = len(opens)
    assert model.generate(PROMPT, max_new_tokens=4) == generate(local_model(ckpt), PROMPT, max_new_tokens=4)
    assert victim not in opens[after_first:] and far in opens[after_first:]


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
            swarm.kill(whole)
    got = [[t[r] for t in rows if t[r] is not None] for r in range(3)]

    assert got == generate(local_model(ckpt), batch, max_new_tokens=10)
    session = model.last_session
    assert session.recoveries == 1 and len(session.chain) == 3
    if kind == "direct_swarm":           # the three re-chained: the two new ones, and the first into them
        assert all(state.pushes for state in session.hops[:-1])
        assert failed_over_once(session, every_other=StepMode.CHAINED)
    else:
        assert failed_over_once(session, every_other=StepMode.HOP_BY_HOP)


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
