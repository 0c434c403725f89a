"""A session's states: the transition table, and a session that refuses work outside its state before sending anything."""

import asyncio
import itertools

import pytest
import torch

from swarmlm.errors import NotFoundError, PeerError, SwarmError
from swarmlm.swarm import wire
from swarmlm.swarm.client.routing import Hop
from swarmlm.swarm.client.session import InferenceSession, SessionOptions
from swarmlm.swarm.client.states import NEXT, READY, SessionState, StepMode, check_transition

S = SessionState
D = 8


class FakeSwarm:
    """Servers that add one to every hidden state, each covering the whole span, tried in `order`;
    records every call. A peer in `dead` fails every call."""

    def __init__(self, order, n_layers=2):
        self.order, self.n_layers = list(order), n_layers
        self.failed = []
        self.dead: set[str] = set()
        self.calls: list[tuple[str, str]] = []        # (peer id, rpc name)

    async def route(self, start, end, *, banned, need_cache_tokens=0, wait_s=None):
        left = [p for p in self.order if p not in banned]
        if not left:
            raise NotFoundError(f"no server holds blocks {start}..{end - 1}")
        return [Hop(left[0], start, end)]

    async def call(self, peer_id, name, request, reply_cls, *, timeout_s):
        self.calls.append((peer_id, name))
        if peer_id in self.dead:
            raise PeerError(f"{peer_id} is gone")
        if name == wire.RPC_OPEN:
            return wire.OpenReply(session_id=request.session_id, dtype="float32")
        if name == wire.RPC_STEP:
            return wire.StepReply(hidden=request.hidden + 1)
        if name == wire.RPC_CLOSE:
            return wire.CloseReply(closed=True)
        return wire.LinkReply(pushes=False)

    async def open_channel(self, peer_id, name, *, timeout_s):
        raise PeerError("no channels here: steps go by unary calls")

    def session_opened(self, peer_id, delta):
        pass

    def peer_failed(self, peer_id):
        self.failed.append(peer_id)


def open_session(swarm):
    return InferenceSession.create(swarm, 0, 2, batch=1, max_length=16, options=SessionOptions(direct=False))


def test_every_transition_outside_the_table_raises():
    for current, requested in itertools.product(S, S):
        if requested in NEXT[current]:
            check_transition(current, requested)
        else:
            with pytest.raises(SwarmError):
                check_transition(current, requested)


def test_only_ready_states_step_and_every_open_state_may_close():
    assert {s for s in S if s in NEXT[s]} == READY            # a step is the ready state again
    assert all(S.CLOSED in NEXT[s] for s in S if s is not S.CLOSED)
    assert NEXT[S.CLOSED] == frozenset()


@pytest.mark.parametrize("current, requested", [
    (S.CLOSED, S.CHAINED),            # a step on a closed session
    (S.RECOVERING, S.RECOVERING),     # a step while a failover is under way
    (S.CHAINED, S.RELINKING),         # a re-link while not recovering
    (S.HOP_BY_HOP, S.REPLAYING),      # a replay with nothing lost
    (S.OPENING, S.RECOVERING),        # opening retries by itself; nothing to fail over yet
    (S.RELINKING, S.REPLAYING),
])
def test_named_illegal_transitions_raise(current, requested):
    with pytest.raises(SwarmError, match="closed" if current is S.CLOSED else current.value):
        check_transition(current, requested)


def test_a_step_on_a_closed_session_raises_before_sending_anything():
    async def go():
        swarm = FakeSwarm(["a"])
        session = await open_session(swarm)
        await session.close()
        sent = len(swarm.calls)
        with pytest.raises(SwarmError, match="closed"):
            await session.step(torch.zeros(1, 1, D))
        return session, swarm.calls[sent:]

    session, after_close = asyncio.run(go())
    assert session.state is S.CLOSED and after_close == []


def test_a_relink_outside_a_failover_raises_before_sending_anything():
    async def go():
        swarm = FakeSwarm(["a"])
        session = await open_session(swarm)
        sent = len(swarm.calls)
        hop = wire.NextHop(peer_id="b", session_id=bytes(wire.SESSION_ID_BYTES), start=0, end=2)
        with pytest.raises(SwarmError, match="relinking"):
            await session._push_to(session.hops[0], hop)
        with pytest.raises(SwarmError, match="recovering"):
            await session._expect_pusher(session.hops[0], "b")
        return session, swarm.calls[sent:]

    session, after = asyncio.run(go())
    assert session.state is S.HOP_BY_HOP and after == []


def test_a_failover_goes_through_its_stages_in_order_and_is_recorded_on_its_step():
    async def go():
        swarm = FakeSwarm(["a", "b"])
        session = await open_session(swarm)
        x = torch.zeros(1, 3, D)
        await session.step(x)
        swarm.dead.add("a")
        y = await session.step(torch.zeros(1, 1, D))
        await session.step(torch.zeros(1, 1, D))
        await session.close()
        return session, y

    session, y = asyncio.run(go())
    assert torch.equal(y, torch.ones(1, 1, D))
    assert session.history == [S.OPENING, S.HOP_BY_HOP, S.RECOVERING, S.REPLAYING, S.RELINKING, S.HOP_BY_HOP,
                               S.CLOSED]
    assert [(r.position, r.length, r.mode) for r in session.step_log] == [
        (0, 3, StepMode.HOP_BY_HOP), (3, 1, StepMode.FAILED_OVER), (4, 1, StepMode.HOP_BY_HOP)]
    assert session.recoveries == 1 and session.chain == [Hop("b", 0, 2)] and session.position == 5


def test_a_failover_with_no_replacement_leaves_the_session_hop_by_hop_to_fail_over_again():
    async def go():
        swarm = FakeSwarm(["a"])
        session = await open_session(swarm)
        await session.step(torch.zeros(1, 2, D))
        swarm.dead.add("a")
        with pytest.raises(NotFoundError):
            await session.step(torch.zeros(1, 1, D))
        state = session.state
        swarm.order.append("b")
        await session.step(torch.zeros(1, 1, D))
        return session, state

    session, state_after_failure = asyncio.run(go())
    assert state_after_failure is S.HOP_BY_HOP
    assert session.recoveries == 1 and session.chain == [Hop("b", 0, 2)]
    assert [r.mode for r in session.step_log] == [StepMode.HOP_BY_HOP, StepMode.FAILED_OVER]
