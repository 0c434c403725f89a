"""The fast lane (swarm/fast.py): chained one-token steps as raw records, handled in the side channel's callback.

Its records parse or fail clearly; a server's fast step equals the slow one (and the local blocks);
a bad fast record gets an ERROR record naming its position while the session and the server go
on; an armed server runs every push into it at once; and generation through a chain of servers
takes the fast lane for its steady steps, with the same tokens as local generation.
"""

import asyncio

import pytest
import torch

from swarmlm.errors import PeerError, RemoteError, UserError, WireError
from swarmlm.model.fastdecode import DecodeStep
from swarmlm.model.generate import generate
from swarmlm.swarm import fast
from swarmlm.swarm.client.fast import FastHop
from swarmlm.swarm.server.fast import FastLane
from tests.helpers.swarm_servers import local_model
from tests.swarm.test_generate import two_halves
from tests.swarm.test_host import D, Harness, full  # noqa: F401 - the fixture

PROMPT = [5, 17, 42, 99, 3, 250]


# ---- records ----------------------------------------------------------------------------------------

def test_a_record_parses_back_and_a_malformed_one_is_refused():
    sid = bytes(range(16))
    kind, flags, got_sid, position, payload = fast.parse(fast.record(fast.REPLY, sid, 7, b"abc", flags=fast.PUSH_FLAG))
    assert (kind, flags, got_sid, position, bytes(payload)) == (fast.REPLY, fast.PUSH_FLAG, sid, 7, b"abc")
    assert fast.is_fast(fast.record(fast.STEP, sid, 0)) and not fast.is_fast(b"\x00\x00\x00\x00\x01x")
    good = fast.record(fast.STEP, sid, 1)
    for bad, why in [(good[:fast.HEAD_BYTES - 1], "shorter than its header"),
                     (good[:1] + bytes([9]) + good[2:], "unknown fast-lane record kind 9"),
                     (good[:2] + bytes([0x80]) + good[3:], "unknown fast-lane flags 0x80")]:
        with pytest.raises(WireError, match=why):
            fast.parse(bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_hidden_states_of_the_wrong_size_or_not_finite_are_refused(dtype):
    x = torch.randn(2, 1, 8).to(dtype)
    payload = memoryview(fast.record(fast.STEP, bytes(16), 1, fast.tensor_bytes(x)))[fast.HEAD_BYTES:]
    assert torch.equal(fast.hidden_of(payload, batch=2, dim=8, dtype=dtype), x)
    with pytest.raises(WireError, match="one position of 1 rows x 8"):
        fast.hidden_of(payload, batch=1, dim=8, dtype=dtype)
    for value in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[1, 0, 3] = value
        bad = memoryview(fast.tensor_bytes(y))
        assert not fast.all_finite(bad, dtype)
        with pytest.raises(WireError, match="NaN or infinity"):
            fast.hidden_of(bad, batch=2, dim=8, dtype=dtype)
        assert fast.hidden_of(bad, batch=2, dim=8, dtype=dtype, finite=False).shape == (2, 1, 8)
    assert fast.all_finite(memoryview(fast.tensor_bytes(torch.full((4,), 6e4).to(dtype))), dtype)   # no overflow
    big = torch.randn(3, 1, 5000).to(dtype)                     # one bad value anywhere among many
    for where in (0, 4095, 4096, 14999):
        for value in (float("nan"), float("inf"), float("-inf")):
            y = big.clone().view(-1)
            y[where] = value
            assert not fast.all_finite(memoryview(fast.tensor_bytes(y)), dtype), (where, value)
    assert fast.all_finite(memoryview(fast.tensor_bytes(big)), dtype)
    wide = torch.randn(2, 6, 8).to(dtype)[:, 2:3]               # not contiguous: its bytes all the same
    assert torch.equal(fast.hidden_of(memoryview(fast.tensor_bytes(wide)), batch=2, dim=8, dtype=dtype), wide)
    source = bytearray(fast.tensor_bytes(x))                    # a tensor of its own: the record's bytes may go
    got = fast.hidden_of(memoryview(source), batch=2, dim=8, dtype=dtype)
    source[:] = bytes(len(source))
    assert torch.equal(got, x)


# ---- one server ---------------------------------------------------------------------------------------

async def _fast_session(full, prompt_len=4, max_length=16):
    """A harness, a direct session holding `prompt_len` positions (by the slow path), its channel's
    connection as a FastHop, and the hidden states (1, max_length, D) and the local blocks' outputs."""
    h = await Harness(full).start(direct=True)
    sid, channel = await h.open_direct(max_length=max_length)
    x = torch.randn(1, max_length, D, generator=torch.Generator().manual_seed(1))
    await h.channel_step(channel, sid, x[:, :prompt_len], 0)
    lane = FastHop.of(channel, sid, h.server.peer_id)
    want = full.run_blocks(x, start=0, end=2)
    return h, sid, channel, lane, x, want


async def _fast_step(lane, sid, position, x, kind=fast.STEP):
    reply = lane.expect(position)
    lane.write(fast.record(kind, sid, position, fast.tensor_bytes(x)))
    return await asyncio.wait_for(reply, 10)


def test_fast_steps_equal_the_local_blocks_and_mix_with_slow_ones(full):
    async def go():
        h, sid, channel, lane, x, want = await _fast_session(full)
        outs = []
        for position in (4, 5):
            kind, flags, payload = await _fast_step(lane, sid, position, x[:, position:position + 1])
            assert (kind, flags) == (fast.REPLY, 0)             # no next server to push to
            outs.append(fast.hidden_of(payload, batch=1, dim=D, dtype=torch.float32))
        outs.append(await h.channel_step(channel, sid, x[:, 6:8], 6))   # a slow step on the same connection
        kind, _, payload = await _fast_step(lane, sid, 8, x[:, 8:9])
        outs.append(fast.hidden_of(payload, batch=1, dim=D, dtype=torch.float32))
        torch.testing.assert_close(torch.cat(outs, 1), want[:, 4:9], atol=1e-5, rtol=1e-5)
        assert h.host.tokens_served == 4 + 2 + 2 + 1
    asyncio.run(go())


def test_a_prompt_step_prepares_the_sessions_one_token_steps(full):
    """Once a prompt's reply has left, the server builds the session's buffers and its span's decode
    step (FastLane.prepare), so the first one-token step finds them and builds nothing."""
    async def go():
        h, sid, channel, lane, x, want = await _fast_session(full)
        session = h.host.sessions[(h.client.peer_id, sid)]
        built = dict(session.cache.__dict__.get("_decode_steps", {}))
        assert session.fast_io is not None and len(built) == 1
        kind, _, payload = await _fast_step(lane, sid, 4, x[:, 4:5])
        assert kind == fast.REPLY and session.cache.__dict__["_decode_steps"] == built
        torch.testing.assert_close(fast.hidden_of(payload, batch=1, dim=D, dtype=torch.float32), want[:, 4:5],
                                   atol=1e-5, rtol=1e-5)
        h.host.fast.prepare((h.client.peer_id, sid))          # again: nothing changes
        assert session.cache.__dict__["_decode_steps"] == built
        h.host.fast.prepare((h.client.peer_id, bytes(16)))    # a session that is not there: nothing
    asyncio.run(go())


@pytest.mark.parametrize("case", ["short payload", "past position", "ahead position", "first position",
                                  "unknown session", "nan", "wait with payload", "reply kind", "malformed"])
def test_a_bad_fast_record_gets_an_error_naming_its_position_and_the_session_goes_on(full, case):
    async def go():
        h, sid, channel, lane, x, want = await _fast_session(full)
        one = x[:, 4:5]
        position, record = 4, None
        if case == "short payload":
            record = fast.record(fast.STEP, sid, 4, fast.tensor_bytes(one)[:-4])
        elif case in ("past position", "ahead position", "first position"):
            position = {"past position": 3, "ahead position": 5, "first position": 0}[case]
        elif case == "unknown session":            # its error names that session: a lane of that id hears it
            record = fast.record(fast.STEP, bytes(16), 4, fast.tensor_bytes(one))
            lane = FastHop.of(channel, bytes(16), h.server.peer_id)
        elif case == "nan":
            one = one.clone()
            one[0, 0, 0] = float("nan")
        elif case == "wait with payload":
            record = fast.record(fast.WAIT, sid, 4, b"x")
        elif case == "reply kind":
            record = fast.record(fast.REPLY, sid, 4, fast.tensor_bytes(one))
        if case == "malformed":                    # cut short: the error names no session (zeros), position 0
            record, position = fast.record(fast.STEP, sid, 4)[:10], 0
            lane = FastHop.of(channel, bytes(16), h.server.peer_id)
        reply = lane.expect(position)
        lane.write(record or fast.record(fast.STEP, sid, position, fast.tensor_bytes(one)))
        kind, _, payload = await asyncio.wait_for(reply, 10)
        assert kind == fast.ERROR and fast.error_text(payload)
        assert h.host.sessions[(h.client.peer_id, sid)].cache.length == 4          # nothing ran, or rolled back
        lane = FastHop.of(channel, sid, h.server.peer_id)
        kind, _, payload = await _fast_step(lane, sid, 4, x[:, 4:5])               # the session goes on
        assert kind == fast.REPLY
        torch.testing.assert_close(fast.hidden_of(payload, batch=1, dim=D, dtype=torch.float32), want[:, 4:5],
                                   atol=1e-5, rtol=1e-5)
    asyncio.run(go())


def test_a_step_off_the_lean_path_is_checked_on_its_bytes_and_rolled_back(full, monkeypatch):
    """Where the span's lean decode step does not apply (here: forced off; a sliding window, dynamic
    rope), the outputs come as a new tensor: their bytes are checked, a NaN's step is refused and the
    cache trimmed back, and a clean step goes on."""
    monkeypatch.setattr(DecodeStep, "supports", staticmethod(lambda model: False))

    async def go():
        h, sid, channel, lane, x, want = await _fast_session(full)
        session = h.host.sessions[(h.client.peer_id, sid)]
        bad = x[:, 4:5].clone()
        bad[0, 0, 1] = float("inf")
        kind, _, payload = await _fast_step(lane, sid, 4, bad)
        assert kind == fast.ERROR and "NaN or infinity" in fast.error_text(payload) and session.cache.length == 4
        kind, _, payload = await _fast_step(lane, sid, 4, x[:, 4:5])
        assert kind == fast.REPLY and not session.cache.__dict__.get("_decode_steps")     # no lean step built
        torch.testing.assert_close(fast.hidden_of(payload, batch=1, dim=D, dtype=torch.float32), want[:, 4:5],
                                   atol=1e-5, rtol=1e-5)
    asyncio.run(go())


def test_an_armed_session_runs_each_push_as_it_comes_and_a_slow_step_disarms_it(full):
    async def go():
        h, sid, channel, lane, x, want = await _fast_session(full)
        session = h.host.sessions[(h.client.peer_id, sid)]
        lane.write(fast.record(fast.WAIT, sid, 4))
        with pytest.raises(RemoteError, match="unknown or closed session"):    # answered after the WAIT was read
            await h.channel_step(channel, bytes(16), x[:, 4:5], 4)
        assert session.inbox._fast is not None
        outs = []
        for position in (4, 5):                    # pushes, as a previous server's would arrive
            reply = lane.expect(position)
            session.inbox.deliver(position, x[:, position:position + 1])
            kind, _, payload = await asyncio.wait_for(reply, 10)
            outs.append(fast.hidden_of(payload, batch=1, dim=D, dtype=torch.float32))
        torch.testing.assert_close(torch.cat(outs, 1), want[:, 4:6], atol=1e-5, rtol=1e-5)
        reply = lane.expect(6)
        session.inbox.deliver(6, None)            # called off: an error, nothing runs
        kind, _, payload = await asyncio.wait_for(reply, 10)
        assert kind == fast.ERROR and "called off" in fast.error_text(payload) and session.cache.length == 6
        await h.channel_step(channel, sid, x[:, 6:7], 6)                          # slow: disarms
        assert session.inbox._fast is None
    asyncio.run(go())


def test_a_push_runs_from_the_sessions_buffer_only_when_armed_and_a_waiting_one_keeps_its_own(full):
    """A push into an armed session is copied into the session's input buffer and runs at once; one
    that must wait for its step (not armed) is a tensor of its own, which later steps through the
    buffer do not touch."""
    class Conn:                                   # a previous server's push connection, as the handler sees it
        peer_id = "pusher"
        closed = False

        def write(self, data):
            raise AssertionError(f"no error expected, got {data!r}")

        def close(self):
            self.closed = True

    async def go():
        h, sid, channel, lane, x, want = await _fast_session(full)
        key = (h.client.peer_id, sid)
        session = h.host.sessions[key]
        session.pusher = Conn.peer_id
        handle = h.host.fast.on_push(Conn(), key)

        def push(position):
            return handle(fast.record(fast.PUSH, sid, position, fast.tensor_bytes(x[:, position:position + 1])))

        lane.write(fast.record(fast.WAIT, sid, 4))
        with pytest.raises(RemoteError, match="unknown or closed session"):    # answered after the WAIT was read
            await h.channel_step(channel, bytes(16), x[:, 4:5], 4)
        assert session.inbox.armed
        reply = lane.expect(4)
        assert push(4)
        kind, _, payload = await asyncio.wait_for(reply, 10)
        assert kind == fast.REPLY and torch.equal(session.fast_io.inp, x[:, 4:5])     # it ran from the buffer
        torch.testing.assert_close(fast.hidden_of(payload, batch=1, dim=D, dtype=torch.float32), want[:, 4:5],
                                   atol=1e-5, rtol=1e-5)
        session.inbox.disarm()                    # as a slow step does: the next push waits for its step
        assert push(5)
        waiting = session.inbox._slots[5].result()
        assert waiting is not session.fast_io.inp and torch.equal(waiting, x[:, 5:6])
        session.fast_io.inp.fill_(3.0)            # what a later step's copy into the buffer would do
        assert torch.equal(waiting, x[:, 5:6])
    asyncio.run(go())


def test_a_lost_connection_fails_the_step_waiting_on_it(full):
    async def go():
        h, sid, channel, lane, x, want = await _fast_session(full)
        reply = lane.expect(4)
        channel.close()
        with pytest.raises(PeerError, match="lost"):
            await asyncio.wait_for(reply, 10)
        with pytest.raises(PeerError, match="lost"):
            await asyncio.wait_for(lane.expect(5), 10)         # and every later one, at once
    asyncio.run(go())


# ---- a chain of servers ---------------------------------------------------------------------------------

def test_generation_through_two_servers_takes_the_fast_lane_with_the_local_tokens(direct_swarm, checkpoints):
    ckpt = checkpoints["llama"]
    model = two_halves(direct_swarm, ckpt)

    out = model.generate(PROMPT, max_new_tokens=12)

    assert out == generate(local_model(ckpt), PROMPT, max_new_tokens=12)
    session = model.last_session
    assert len(session.hops) == 2 and session.chained
    assert session.fast_steps == 12 - 1 and session.fast_relays == 0       # every step after the prompt's


def test_a_server_that_refuses_fast_steps_is_stepped_the_slow_way_with_the_same_tokens(direct_swarm, checkpoints,
                                                                                        monkeypatch):
    refused = []
    real = FastLane._steps_record

    def refusing(self, conn, plain):               # the second server refuses every fast record it is sent
        if self.host.start == 2:
            kind, _, sid, position, _ = fast.parse(plain)
            refused.append(kind)
            self._refuse(conn, sid, position, WireError("not today"))
            return
        real(self, conn, plain)
    monkeypatch.setattr(FastLane, "_steps_record", refusing)
    ckpt = checkpoints["llama"]
    model = two_halves(direct_swarm, ckpt)

    out = model.generate(PROMPT, max_new_tokens=8)

    assert out == generate(local_model(ckpt), PROMPT, max_new_tokens=8)
    session = model.last_session
    assert refused == [fast.WAIT] * fast.MAX_REFUSALS and session.recoveries == 0   # then it stops offering them
    assert session.fast_steps == 0


@pytest.mark.parametrize("lane", ["fast", "libp2p"])
def test_a_callers_nan_is_refused_by_the_servers_without_a_failover_and_the_session_goes_on(request, checkpoints,
                                                                                          lane):
    """A step whose hidden states hold a NaN fails with a UserError; no server is blamed or replaced,
    and the session's next steps equal a clean session's. On the fast lane the first server checks
    its outputs before they go on: it refuses the step, advances nothing, and pushes nothing, so
    the second server never computes on the NaN."""
    ckpt = checkpoints["llama"]
    model = two_halves(request.getfixturevalue("direct_swarm" if lane == "fast" else "swarm"), ckpt)
    refused, ran = [], []
    real = FastLane._run

    def watched(self, conn, key, session, position, hidden, push):
        ran.append((self.host.start, position))
        try:
            real(self, conn, key, session, position, hidden, push)
        except WireError as e:
            refused.append((self.host.start, position, str(e), session.cache.length))
            raise
    x = torch.randn(1, 7, model.cfg.dim)
    outs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FastLane, "_run", watched)
        for poisoned in (False, True):
            with model.inference_session(batch=1, max_length=8) as session:
                got = [session.step(x[:, :4]), session.step(x[:, 4:5])]     # the prompt, then steady steps
                if poisoned:
                    bad = x[:, 5:6].clone()
                    bad[0, 0, 3] = float("nan")
                    with pytest.raises(UserError, match="blocks 0:2 hold NaN or infinity"):
                        session.step(bad)
                got += [session.step(x[:, 5:6]), session.step(x[:, 6:7])]
                outs[poisoned] = torch.cat(got, 1)
                assert session.recoveries == 0
    torch.testing.assert_close(outs[True], outs[False], atol=1e-5, rtol=1e-5)
    if lane == "fast":      # the refusal came before the client's error; only clean inputs reached the second
        assert [r[:2] for r in refused] == [(0, 5)]
        assert "NaN or infinity" in refused[0][2] and refused[0][3] == 5                  # nothing advanced
        assert ran.count((2, 5)) == 2                     # position 5 there: the clean session's, the clean retry
    else:
        assert refused == []
