"""BlockHost handlers: results equal the local blocks, and bad input gets an error reply while other sessions go on."""

import asyncio
import os

import pytest
import torch

from swarmlm.errors import AccessRefused, PeerError, RemoteError
from swarmlm.model.config import PRESETS
from swarmlm.model.transformer import Transformer
from swarmlm.p2p.memory import MemoryNetwork, MemoryPeer
from swarmlm.p2p import keys, rpc
from swarmlm.p2p.channel.policy import DialLimiter
from swarmlm.p2p.channel.service import Endpoint
from swarmlm.p2p.identity import Identity
from swarmlm.p2p.records import seal
from swarmlm.p2p.rpc import Channel, call_message
from swarmlm.swarm import wire
from swarmlm.swarm.server.budget import BudgetLimits
from swarmlm.swarm.server import chain
from swarmlm.swarm.server.host import BlockHost
from tests.helpers.sockets import CountingListener

CFG = PRESETS["tiny"].replace(vocab_size=64)
D = CFG.dim


@pytest.fixture(scope="module")
def full():
    torch.manual_seed(0)
    return Transformer(CFG).eval().requires_grad_(False)


class Harness:
    """A host for blocks 0:2 on a MemoryPeer, and a client peer calling it."""

    def __init__(self, full, limits=None):
        part = Transformer(CFG, layers=range(0, 2), with_embed=False, with_head=False)
        part.load_state_dict({k: v for k, v in full.state_dict().items() if k in part.state_dict()})
        self.host = BlockHost(part, model_id="m", limits=limits or BudgetLimits(max_session_tokens=64,
                                                                             max_request_tokens=256))

    async def start(self, direct=False):
        net = MemoryNetwork()
        self.server, self.client = await MemoryPeer.create(net), await MemoryPeer.create(net)
        await self.host.register(self.server, side=await self.server.side_channel() if direct else None)
        return self

    async def open_direct(self, batch=1, max_length=16, client=None):
        """A session whose steps channel goes over the side channel; (session id, channel)."""
        sid, client = os.urandom(16), client or self.client
        req = wire.OpenRequest(sid, 0, 2, batch, max_length)
        reply = await call_message(client, self.server.peer_id, wire.RPC_OPEN, req, wire.OpenReply, timeout_s=10)
        conn = await (await client.side_channel()).open(self.server.peer_id, wire.PURPOSE_STEPS, timeout_s=5,
                                                        max_record_bytes=1 << 24, endpoint=reply.endpoint)
        return sid, Channel(conn, conn, peer_id=self.server.peer_id, name="direct")

    async def until_waiting(self, sid, position):
        """Until the server holds a step of session `sid` waiting for its pushed input at `position`."""
        inbox = self.host.sessions[(self.client.peer_id, sid)].inbox
        for _ in range(10_000):
            if inbox.waiting(position):
                return
            await asyncio.sleep(0)
        raise AssertionError(f"no step came to wait at position {position}")

    async def call(self, name, req, reply_cls):
        return await call_message(self.client, self.server.peer_id, name, req, reply_cls, timeout_s=10,
                                  max_response_bytes=1 << 24)

    async def open(self, batch=1, max_length=16, start=0, end=2):
        sid = os.urandom(16)
        await self.call(wire.RPC_OPEN, wire.OpenRequest(sid, start, end, batch, max_length), wire.OpenReply)
        return sid

    async def step(self, sid, x, position, start=0, end=2, **kw):
        req = wire.StepRequest(sid, start, end, position, x, **kw)
        return (await self.call(wire.RPC_STEP, req, wire.StepReply)).hidden

    async def channel(self):
        reader, writer = await self.client.open_raw_stream(self.server.peer_id, wire.RPC_STEPS)
        return Channel(reader, writer, peer_id=self.server.peer_id, name=wire.RPC_STEPS)

    async def channel_step(self, ch, sid, x, position, start=0, end=2, **kw):
        req = wire.StepRequest(sid, start, end, position, x, **kw)
        return (await ch.call_message(req, wire.StepReply, timeout_s=10, max_response_bytes=1 << 24)).hidden


def run(coro):
    return asyncio.run(coro)


def test_steps_equal_the_local_blocks_with_a_cache(full):
    async def go():
        h = await Harness(full).start()
        sid = await h.open()
        x = torch.randn(1, 5, D)
        a = await h.step(sid, x[:, :4], 0)
        b = await h.step(sid, x[:, 4:], 4)
        return torch.cat([a, b], 1), full.run_blocks(x, start=0, end=2)

    got, want = run(go())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_retried_step_replaces_its_first_try(full):
    async def go():
        h = await Harness(full).start()
        sid = await h.open()
        x = torch.randn(1, 3, D)
        await h.step(sid, x[:, :2], 0)
        await h.step(sid, torch.randn(1, 1, D), 2)        # a step whose reply the client never saw
        again = await h.step(sid, x[:, 2:], 2)            # the retry, at the same position
        return again, full.run_blocks(x, start=0, end=2)[:, 2:]

    got, want = run(go())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_chunked_replay_reproduces_single_steps_bit_for_bit(full):
    async def go():
        h = await Harness(full).start()
        a, b = await h.open(), await h.open()
        x = torch.randn(1, 6, D)
        singles = [await h.step(a, x[:, :3], 0)] + [await h.step(a, x[:, i:i + 1], i) for i in range(3, 6)]
        replay = await h.step(b, x, 0, chunks=[3, 1, 1, 1])
        return torch.cat(singles, 1), replay

    singles, replay = run(go())
    assert torch.equal(singles, replay)


def _reference_grads(full, x, g, prompts):
    from swarmlm.swarm.blocks import run_span
    xl, pl = x.clone().requires_grad_(True), prompts.clone().requires_grad_(True)
    with torch.enable_grad():
        run_span(full, xl, 0, 2, prompts=pl).backward(g)
    return xl.grad, pl.grad


@pytest.mark.parametrize("case", ["kept", "evicted", "other inputs", "other caller"])
def test_backward_of_a_kept_forward_equals_local_autograd(full, case):
    async def go():
        limits = BudgetLimits(max_session_tokens=64, max_request_tokens=256,
                              max_kept_bytes=1 if case == "evicted" else 1 << 30)
        h = await Harness(full, limits).start()
        x, g, prompts = torch.randn(2, 5, D), torch.randn(2, 5, D), torch.randn(2, 1, 3, D)
        keep_id = os.urandom(wire.KEEP_ID_BYTES)
        await h.call(wire.RPC_FORWARD, wire.SpanForwardRequest(0, 2, x, None, prompts, keep_id=keep_id),
                     wire.SpanForwardReply)
        n_kept = len(h.host.kept)
        if case == "other inputs":
            x = torch.randn(2, 5, D)
        req = wire.SpanBackwardRequest(0, 2, x, g, None, prompts, keep_id=keep_id)
        if case == "other caller":
            other = await MemoryPeer.create(h.server.network)
            bwd = await call_message(other, h.server.peer_id, wire.RPC_BACKWARD, req, wire.SpanBackwardReply,
                                     timeout_s=10, max_response_bytes=1 << 24)
        else:
            bwd = await h.call(wire.RPC_BACKWARD, req, wire.SpanBackwardReply)
        return x, g, prompts, bwd, n_kept, len(h.host.kept)

    x, g, prompts, bwd, n_kept, n_left = run(go())
    grad_x, grad_p = _reference_grads(full, x, g, prompts)
    torch.testing.assert_close(bwd.grad_hidden, grad_x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bwd.grad_prompts, grad_p, atol=1e-5, rtol=1e-5)
    assert n_kept == (0 if case == "evicted" else 1)
    assert n_left == (1 if case == "other caller" else 0)


@pytest.mark.parametrize("name,req,cls", [
    (wire.RPC_FORWARD, wire.SpanForwardRequest(0, 2, torch.randn(1, 2, D), keep_id=b"short"), wire.SpanForwardReply),
    (wire.RPC_BACKWARD, wire.SpanBackwardRequest(0, 2, torch.randn(1, 2, D), torch.randn(1, 2, D), keep_id=b"x" * 17),
     wire.SpanBackwardReply),
])
def test_a_bad_keep_id_gets_an_error_reply(full, name, req, cls):
    async def go():
        h = await Harness(full).start()
        with pytest.raises(RemoteError, match="keep id"):
            await h.call(name, req, cls)
        return len(h.host.kept)

    assert run(go()) == 0


def test_kept_forwards_expire_on_sweep(full):
    now = [0.0]
    h = Harness(full, BudgetLimits(kept_timeout_s=5.0))
    h.host.clock = lambda: now[0]

    async def go():
        await h.start()
        req = wire.SpanForwardRequest(0, 2, torch.randn(1, 2, D), keep_id=os.urandom(wire.KEEP_ID_BYTES))
        await h.call(wire.RPC_FORWARD, req, wire.SpanForwardReply)
        kept = len(h.host.kept)
        now[0] = 6.0
        h.host.sweep()
        return kept, len(h.host.kept), h.host.kept.used_bytes

    assert run(go()) == (1, 0, 0)


def test_forward_and_backward_equal_local_autograd(full):
    async def go():
        h = await Harness(full).start()
        x, g = torch.randn(2, 5, D), torch.randn(2, 5, D)
        prompts = torch.randn(2, 1, 3, D)
        fwd = await h.call(wire.RPC_FORWARD, wire.SpanForwardRequest(0, 2, x, None, prompts), wire.SpanForwardReply)
        bwd = await h.call(wire.RPC_BACKWARD, wire.SpanBackwardRequest(0, 2, x, g, None, prompts),
                           wire.SpanBackwardReply)
        return x, g, prompts, fwd.hidden, bwd

    x, g, prompts, out, bwd = run(go())
    from swarmlm.swarm.blocks import run_span
    xl, pl = x.clone().requires_grad_(True), prompts.clone().requires_grad_(True)
    with torch.enable_grad():
        ref = run_span(full, xl, 0, 2, prompts=pl)
        ref.backward(g)
    torch.testing.assert_close(out, ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bwd.grad_hidden, xl.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bwd.grad_prompts, pl.grad, atol=1e-5, rtol=1e-5)


BAD_STEPS = {
    "wrong width": dict(x=torch.randn(1, 2, D + 1)),
    "wrong rank": dict(x=torch.randn(2, D)),
    "wrong dtype": dict(x=torch.randn(1, 2, D, dtype=torch.float64)),
    "integer hidden": dict(x=torch.ones(1, 2, D, dtype=torch.int64)),
    "wrong batch": dict(x=torch.randn(3, 2, D)),
    "empty": dict(x=torch.randn(1, 0, D)),
    "nan": dict(x=torch.full((1, 2, D), float("nan"))),
    "too many tokens": dict(x=torch.randn(1, 17, D)),
    "position ahead": dict(x=torch.randn(1, 1, D), position=5),
    "span not held": dict(x=torch.randn(1, 2, D), start=2, end=4),
    "span differs": dict(x=torch.randn(1, 2, D), start=0, end=1),
    "mask shape": dict(x=torch.randn(1, 2, D), key_mask=torch.ones(1, 3, dtype=torch.bool)),
    "mask dtype": dict(x=torch.randn(1, 2, D), key_mask=torch.ones(1, 2)),
    "prompts shape": dict(x=torch.randn(1, 2, D), prompts=torch.randn(1, 1, 2, D)),
    "bad chunks": dict(x=torch.randn(1, 2, D), chunks=[1, 2]),
}


@pytest.mark.parametrize("case", list(BAD_STEPS))
def test_bad_step_gets_an_error_reply_and_other_sessions_go_on(full, case):
    async def go():
        h = await Harness(full).start()
        good, bad = await h.open(), await h.open()
        x = torch.randn(1, 3, D)
        first = await h.step(good, x[:, :2], 0)
        kw = dict(BAD_STEPS[case])
        with pytest.raises(RemoteError):
            await h.step(bad, kw.pop("x"), kw.pop("position", 0), **kw)
        second = await h.step(good, x[:, 2:], 2)
        return torch.cat([first, second], 1), full.run_blocks(x, start=0, end=2)

    got, want = run(go())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_unknown_closed_and_foreign_sessions_are_refused(full):
    async def go():
        h = await Harness(full).start()
        x = torch.randn(1, 1, D)
        with pytest.raises(RemoteError, match="unknown or closed"):
            await h.step(os.urandom(16), x, 0)
        sid = await h.open()
        await h.call(wire.RPC_CLOSE, wire.CloseRequest(sid), wire.CloseReply)
        with pytest.raises(RemoteError, match="unknown or closed"):
            await h.step(sid, x, 0)
        mine = await h.open()
        other = await MemoryPeer.create(h.server.network)
        req = wire.StepRequest(mine, 0, 2, 0, x)
        with pytest.raises(RemoteError, match="unknown or closed"):
            await call_message(other, h.server.peer_id, wire.RPC_STEP, req, wire.StepReply, timeout_s=5)
        return await h.step(mine, x, 0)

    assert run(go()).shape == (1, 1, D)


@pytest.mark.parametrize("req", [
    wire.OpenRequest(b"short", 0, 2, 1, 8),
    wire.OpenRequest(b"x" * 16, 0, 3, 1, 8),
    wire.OpenRequest(b"x" * 16, 0, 2, 1, 10_000),
    wire.OpenRequest(b"x" * 16, 0, 2, 0, 8),
    wire.OpenRequest(b"x" * 16, 0, 2, 5, 16),
    wire.OpenRequest(b"x" * 16, 0, 2, 1, 8, pusher="not a peer id"),
])
def test_bad_open_gets_an_error_reply(full, req):
    async def go():
        h = await Harness(full).start()
        with pytest.raises(RemoteError):
            await h.call(wire.RPC_OPEN, req, wire.OpenReply)
        return h.host.budget.n_sessions

    assert run(go()) == 0


def test_too_many_sessions_are_refused_with_a_clear_error(full):
    async def go():
        h = await Harness(full, BudgetLimits(max_sessions=2)).start()
        await h.open()
        await h.open()
        with pytest.raises(RemoteError, match="server full"):
            await h.open()

    run(go())


@pytest.mark.parametrize("name,req,cls", [
    (wire.RPC_FORWARD, wire.SpanForwardRequest(0, 3, torch.randn(1, 2, D)), wire.SpanForwardReply),
    (wire.RPC_FORWARD, wire.SpanForwardRequest(0, 2, torch.randn(1, 2, 7)), wire.SpanForwardReply),
    (wire.RPC_FORWARD, wire.SpanForwardRequest(0, 2, torch.randn(1, 300, D)), wire.SpanForwardReply),
    (wire.RPC_FORWARD, wire.SpanForwardRequest(0, 2, torch.randn(1, 2, D).half()), wire.SpanForwardReply),
    (wire.RPC_BACKWARD, wire.SpanBackwardRequest(0, 2, torch.randn(1, 2, D), torch.randn(1, 3, D)),
     wire.SpanBackwardReply),
    (wire.RPC_BACKWARD, wire.SpanBackwardRequest(1, 3, torch.randn(1, 2, D), torch.randn(1, 2, D)),
     wire.SpanBackwardReply),
])
def test_bad_forward_and_backward_get_an_error_reply(full, name, req, cls):
    async def go():
        h = await Harness(full).start()
        with pytest.raises(RemoteError):
            await h.call(name, req, cls)
        ok = await h.call(wire.RPC_FORWARD, wire.SpanForwardRequest(0, 2, torch.randn(1, 2, D)),
                          wire.SpanForwardReply)
        return ok.hidden.shape

    assert run(go()) == (1, 2, D)


@pytest.mark.parametrize("name", wire.RPC_NAMES)
def test_garbage_bytes_get_an_error_reply(full, name):
    async def go():
        h = await Harness(full).start()
        with pytest.raises(RemoteError):
            await h.client.call(h.server.peer_id, name, b"\xc1garbage", timeout_s=5, max_response_bytes=1 << 20)
        info = await h.call(wire.RPC_INFO, wire.InfoRequest(), wire.InfoReply)
        return info.state

    assert run(go()) == "joining"


def test_idle_sessions_time_out_and_free_their_cache(full):
    now = [0.0]
    h = Harness(full, BudgetLimits(idle_timeout_s=10.0))
    h.host.clock = lambda: now[0]

    async def go():
        await h.start()
        sid = await h.open()
        now[0] = 11.0
        assert h.host.sweep() == 1
        with pytest.raises(RemoteError, match="unknown or closed"):
            await h.step(sid, torch.randn(1, 1, D), 0)
        return h.host.budget.free_tokens

    assert run(go()) == h.host.budget.limits.max_cache_tokens


# ---- the steps channel ------------------------------------------------------------------------

def test_steps_on_a_channel_equal_the_local_blocks(full):
    async def go():
        h = await Harness(full).start()
        sid, ch = await h.open(batch=2), await h.channel()
        x = torch.randn(2, 5, D)
        outs = [await h.channel_step(ch, sid, x[:, :3], 0), await h.channel_step(ch, sid, x[:, 3:4], 3),
                await h.channel_step(ch, sid, x[:, 4:], 4)]
        return torch.cat(outs, 1), full.run_blocks(x, start=0, end=2)

    got, want = run(go())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", list(BAD_STEPS) + ["unknown session"])
def test_bad_step_on_a_channel_gets_an_error_frame_and_the_channel_goes_on(full, case):
    async def go():
        h = await Harness(full).start()
        good, bad, ch = await h.open(), await h.open(), await h.channel()
        if case == "unknown session":
            bad, kw = os.urandom(16), dict(x=torch.randn(1, 1, D))
        else:
            kw = dict(BAD_STEPS[case])
        x = torch.randn(1, 3, D)
        first = await h.channel_step(ch, good, x[:, :2], 0)
        with pytest.raises(RemoteError):
            await h.channel_step(ch, bad, kw.pop("x"), kw.pop("position", 0), **kw)
        second = await h.channel_step(ch, good, x[:, 2:], 2)
        return torch.cat([first, second], 1), full.run_blocks(x, start=0, end=2)

    got, want = run(go())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_garbage_request_frame_on_a_channel_gets_an_error_frame_and_the_channel_goes_on(full):
    async def go():
        h = await Harness(full).start()
        sid, ch = await h.open(), await h.channel()
        with pytest.raises(RemoteError):
            await ch.call(b"\xc1garbage", timeout_s=5, max_response_bytes=1 << 20)
        return await h.channel_step(ch, sid, torch.randn(1, 1, D), 0)

    assert run(go()).shape == (1, 1, D)


def test_oversized_frame_on_a_channel_is_refused_unread_and_the_session_survives(full):
    async def go():
        h = await Harness(full).start()
        sid = await h.open()
        reader, writer = await h.client.open_raw_stream(h.server.peer_id, wire.RPC_STEPS)
        writer.write(bytes([rpc.REQUEST]) + (1 << 31).to_bytes(4, "big"))   # claims 2 GiB, sends none
        tag, payload = await asyncio.wait_for(rpc.read_frame(reader, max_bytes=1 << 16), 5)
        writer.close()
        return tag, payload.decode(), await h.step(sid, torch.randn(1, 1, D), 0)

    tag, message, out = run(go())
    assert tag == rpc.ERROR and "exceeds" in message and out.shape == (1, 1, D)


def test_a_channel_to_a_killed_server_fails_with_peer_error(full):
    async def go():
        h = await Harness(full).start()
        sid, ch = await h.open(), await h.channel()
        await h.channel_step(ch, sid, torch.randn(1, 1, D), 0)
        h.server.network.kill(h.server.peer_id)
        with pytest.raises(PeerError):
            await h.channel_step(ch, sid, torch.randn(1, 1, D), 1)

    run(go())


# ---- the direct steps channel ----------------------------------------------------------------------

def test_a_host_without_a_side_channel_offers_none(full):
    async def go():
        h = await Harness(full).start()
        return await h.call(wire.RPC_OPEN, wire.OpenRequest(os.urandom(16), 0, 2, 1, 8), wire.OpenReply)

    assert run(go()).endpoint is None


def test_steps_on_a_direct_channel_equal_the_local_blocks_and_bad_ones_get_error_frames(full):
    async def go():
        h = await Harness(full).start(direct=True)
        try:
            sid, ch = await h.open_direct(batch=2)
            x = torch.randn(2, 5, D)
            first = await h.channel_step(ch, sid, x[:, :3], 0)
            for case in ("wrong width", "nan", "wrong dtype", "span not held"):
                kw = dict(BAD_STEPS[case])
                kw["x"] = kw["x"].expand(2, *kw["x"].shape[1:]) if kw["x"].dim() == 3 else kw["x"]
                with pytest.raises(RemoteError):
                    await h.channel_step(ch, sid, kw.pop("x"), kw.pop("position", 3), **kw)
            with pytest.raises(RemoteError):
                await ch.call(b"\xc1garbage", timeout_s=5, max_response_bytes=1 << 20)
            second = await h.channel_step(ch, sid, x[:, 3:], 3)
            ch.close()
            return torch.cat([first, second], 1), full.run_blocks(x, start=0, end=2)
        finally:
            h.host.close()

    got, want = run(go())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_direct_channel_speaks_only_for_the_peer_that_dialed_it(full):
    async def go():
        h = await Harness(full).start(direct=True)
        try:
            alices = await h.open()                          # a session of the client peer
            mallory = await MemoryPeer.create(h.server.network)
            _, ch = await h.open_direct(client=mallory)      # mallory's own direct channel
            with pytest.raises(RemoteError, match="unknown or closed"):
                await h.channel_step(ch, alices, torch.randn(1, 1, D), 0)
            ch.close()
            return await h.step(alices, torch.randn(1, 1, D), 0)
        finally:
            h.host.close()

    assert run(go()).shape == (1, 1, D)


def test_a_direct_channel_to_a_killed_server_fails_with_peer_error(full):
    async def go():
        h = await Harness(full).start(direct=True)
        sid, ch = await h.open_direct()
        await h.channel_step(ch, sid, torch.randn(1, 1, D), 0)
        h.server.network.kill(h.server.peer_id)           # its side channel's connections are cut
        with pytest.raises(PeerError):
            await h.channel_step(ch, sid, torch.randn(1, 1, D), 1)

    run(go())


# ---- chained steps: pushed inputs --------------------------------------------------------------------

def _pushed(sid, x, position):
    return wire.StepRequest(sid, 0, 2, position, x, pushed=True)


@pytest.mark.parametrize("push_first", [True, False])
def test_a_step_without_hidden_states_runs_on_its_pushed_input(full, push_first):
    async def go():
        h = await Harness(full).start()
        sid = await h.open()
        x = torch.randn(1, 2, D)
        await h.step(sid, x[:, :1], 0)
        if push_first:
            await h.call(wire.RPC_STEP, _pushed(sid, x[:, 1:], 1), wire.StepReply)
            out = await h.step(sid, None, 1)
        else:
            waiting = asyncio.create_task(h.step(sid, None, 1))
            await h.until_waiting(sid, 1)
            await h.call(wire.RPC_STEP, _pushed(sid, x[:, 1:], 1), wire.StepReply)
            out = await waiting
        return out, full.run_blocks(x, start=0, end=2)[:, 1:]

    got, want = run(go())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_called_off_or_late_step_fails_and_the_session_goes_on(full, monkeypatch):
    monkeypatch.setattr(chain, "PUSH_WAIT_S", 0.2)

    async def go():
        h = await Harness(full).start()
        sid = await h.open()
        x = torch.randn(1, 2, D)
        waiting = asyncio.create_task(h.step(sid, None, 0))
        await h.until_waiting(sid, 0)
        await h.call(wire.RPC_STEP, _pushed(sid, None, 0), wire.StepReply)     # the client calls it off
        with pytest.raises(RemoteError, match="called off"):
            await waiting
        with pytest.raises(RemoteError, match="no input was pushed"):
            await h.step(sid, None, 0)                                          # nobody pushes: bounded wait
        return await h.step(sid, x, 0), full.run_blocks(x, start=0, end=2)

    got, want = run(go())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["wrong width", "nan", "wrong batch", "twice", "far position", "unknown session",
                                  "too many"])
def test_a_bad_push_is_refused_to_the_pusher_and_the_session_goes_on(full, case):
    async def go():
        h = await Harness(full).start()
        sid = await h.open()
        good = torch.randn(1, 1, D)
        if case == "twice":
            await h.call(wire.RPC_STEP, _pushed(sid, good, 0), wire.StepReply)
            req = _pushed(sid, good, 0)
        elif case == "far position":
            req = _pushed(sid, good, 10_000)
        elif case == "unknown session":
            req = _pushed(os.urandom(16), good, 0)
        elif case == "too many":
            for p in range(4):
                await h.call(wire.RPC_STEP, _pushed(sid, good, p + 1), wire.StepReply)
            req = _pushed(sid, good, 9)
        else:
            req = _pushed(sid, BAD_STEPS[case]["x"], 0)
        with pytest.raises(RemoteError):
            await h.call(wire.RPC_STEP, req, wire.StepReply)
        return await h.step(sid, good, 0), full.run_blocks(good, start=0, end=2)

    got, want = run(go())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hop", [
    dict(peer_id=""),
    dict(peer_id="not/a peer"),
    dict(session_id=b"short"),
    dict(start=3, end=3),
    dict(endpoint=b""),
])
def test_a_malformed_next_hop_gets_an_error_reply(full, hop):
    async def go():
        h = await Harness(full).start(direct=True)
        fields = dict(peer_id=h.client.peer_id, session_id=os.urandom(16), start=2, end=4) | hop
        req = wire.OpenRequest(os.urandom(16), 0, 2, 1, 8, next_hop=wire.NextHop(**fields))
        with pytest.raises(RemoteError, match="next hop"):
            await h.call(wire.RPC_OPEN, req, wire.OpenReply)
        return h.host.budget.n_sessions

    assert run(go()) == 0


def test_a_next_hop_that_announces_no_side_channel_opens_a_session_that_does_not_push(full):
    async def go():
        h = await Harness(full).start(direct=True)
        nxt = wire.NextHop(h.client.peer_id, os.urandom(16), 2, 4)      # the client listens nowhere
        reply = await h.call(wire.RPC_OPEN, wire.OpenRequest(os.urandom(16), 0, 2, 1, 8, next_hop=nxt),
                             wire.OpenReply)
        return reply.pushes, h.host.budget.n_sessions

    assert run(go()) == (False, 1)


@pytest.mark.parametrize("rpc_name", [wire.RPC_OPEN, wire.RPC_LINK])
@pytest.mark.parametrize("case", ["an unannounced port", "a host name", "another peer's address"])
def test_a_next_hop_address_its_peer_did_not_announce_is_refused_and_never_dialed(full, case, rpc_name):
    async def go():
        h = await Harness(full).start(direct=True)
        trap = CountingListener()
        target = await MemoryPeer.create(h.server.network)           # a real peer: the named next hop
        bystander = await MemoryPeer.create(h.server.network)
        await (await bystander.side_channel()).serve("x", lambda conn: asyncio.sleep(0), max_record_bytes=64)
        forged = {
            "an unannounced port": seal(Identity.generate(), keys.endpoint_key(target.peer_id),
                                        Endpoint([f"/ip4/127.0.0.1/tcp/{trap.port}"]), expires_at=2e9),
            "a host name": seal(target.identity, keys.endpoint_key(target.peer_id),
                                Endpoint([f"/dns4/localhost/tcp/{trap.port}"]), expires_at=2e9,
                                subkey=keys.peer_subkey(target.peer_id)),
            "another peer's address": (await bystander.side_channel()).sealed_endpoint(),
        }[case]
        hop = wire.NextHop(target.peer_id, os.urandom(16), 2, 4, endpoint=forged)
        if rpc_name == wire.RPC_OPEN:
            req = wire.OpenRequest(os.urandom(16), 0, 2, 1, 8, next_hop=hop)
            reply_cls = wire.OpenReply
        else:
            req, reply_cls = wire.LinkRequest(await h.open(), next_hop=hop), wire.LinkReply
        with pytest.raises(RemoteError, match="refusing to dial"):
            await h.call(rpc_name, req, reply_cls)
        return trap.accepted(), (await bystander.side_channel()).accepted, h.host.budget.n_sessions

    accepted, bystander_accepted, n_sessions = run(go())
    assert accepted == 0 and bystander_accepted == 0
    assert n_sessions == (0 if rpc_name == wire.RPC_OPEN else 1)


def test_next_hop_dials_are_capped_per_client_across_its_sessions(full):
    """Closing and reopening sessions does not reset how many next hops one client may have dialed."""
    async def go():
        h = await Harness(full).start(direct=True)
        h.host.dials = DialLimiter(max_dials=2, window_s=3600, clock=h.host.clock)
        side = await h.server.side_channel()
        pushes = []
        for _ in range(3):
            into = os.urandom(16)             # a session here that the same server pushes into
            opened = await h.call(wire.RPC_OPEN, wire.OpenRequest(into, 0, 2, 1, 8, pusher=h.server.peer_id),
                                  wire.OpenReply)
            hop = wire.NextHop(h.server.peer_id, into, 0, 2, endpoint=opened.endpoint)
            sid = os.urandom(16)
            reply = await h.call(wire.RPC_OPEN, wire.OpenRequest(sid, 0, 2, 1, 8, next_hop=hop), wire.OpenReply)
            pushes.append(reply.pushes)
            for s in (sid, into):
                await h.call(wire.RPC_CLOSE, wire.CloseRequest(s), wire.CloseReply)
        return pushes, side.accepted

    pushes, accepted = run(go())
    assert pushes == [True, True, False]
    assert accepted == 2 * 1 + 0        # the two allowed push connections; the third was never dialed


def test_a_push_connection_from_a_peer_the_client_did_not_name_is_refused(full):
    async def go():
        h = await Harness(full).start(direct=True)
        sid = await h.open()                                  # no pusher named
        opened = await h.call(wire.RPC_OPEN, wire.OpenRequest(os.urandom(16), 0, 2, 1, 8), wire.OpenReply)
        mallory = await MemoryPeer.create(h.server.network)
        conn = await (await mallory.side_channel()).open(h.server.peer_id, wire.PURPOSE_PUSH, timeout_s=5,
                                                         max_record_bytes=1 << 20, endpoint=opened.endpoint)
        ch = Channel(conn, conn, peer_id=h.server.peer_id, name="push")
        with pytest.raises(RemoteError, match="no session here takes pushes from you"):
            await ch.call_message(wire.PushBind(h.client.peer_id, sid), wire.PushBound, timeout_s=5)
        good = torch.randn(1, 1, D)
        return await h.step(sid, good, 0), full.run_blocks(good, start=0, end=2)

    got, want = run(go())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_step_waiting_for_a_push_fails_cleanly_when_its_session_closes(full):
    async def go():
        h = await Harness(full).start()
        sid = await h.open()
        waiting = asyncio.create_task(h.step(sid, None, 0))
        await h.until_waiting(sid, 0)
        await h.call(wire.RPC_CLOSE, wire.CloseRequest(sid), wire.CloseReply)
        with pytest.raises(RemoteError, match="the session was closed"):
            await waiting
        other = await h.open()
        return await h.step(other, torch.randn(1, 1, D), 0)

    assert run(go()).shape == (1, 1, D)


@pytest.mark.parametrize("position", [-1, 10_000])
def test_a_step_waiting_for_a_push_at_a_position_out_of_range_is_refused_at_once(full, position):
    async def go():
        h = await Harness(full).start()
        sid = await h.open()
        with pytest.raises(RemoteError, match="the session allows"):
            await asyncio.wait_for(h.step(sid, None, position), 5)       # not after the 30 s push wait
        good = torch.randn(1, 1, D)
        return await h.step(sid, good, 0), full.run_blocks(good, start=0, end=2)

    got, want = run(go())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ---- re-linking a chain around a replaced server ------------------------------------------------------

def test_link_makes_a_session_push_to_a_new_next_hop_that_expects_it(full):
    """Session a pushes into session b (both here): linked, then re-linked as after a failover (b told to
    take pushes from the pusher again, a pointed at it)."""
    async def go():
        h = await Harness(full).start(direct=True)
        a, b = await h.open(), os.urandom(16)
        opened = await h.call(wire.RPC_OPEN, wire.OpenRequest(b, 0, 2, 1, 16), wire.OpenReply)
        x = torch.randn(1, 2, D)
        outs = []
        for position in range(2):
            await h.call(wire.RPC_LINK, wire.LinkRequest(b, pusher=h.server.peer_id), wire.LinkReply)
            hop = wire.NextHop(h.server.peer_id, b, 0, 2, endpoint=opened.endpoint)
            linked = await h.call(wire.RPC_LINK, wire.LinkRequest(a, next_hop=hop), wire.LinkReply)
            assert linked.pushes
            waiting = asyncio.create_task(h.step(b, None, position))
            reply = await h.call(wire.RPC_STEP, wire.StepRequest(a, 0, 2, position, x[:, position:position + 1],
                                                                 push=True), wire.StepReply)
            assert reply.pushed
            outs.append(await asyncio.wait_for(waiting, 10))
        return torch.cat(outs, dim=1), full.run_blocks(full.run_blocks(x, start=0, end=2), start=0, end=2)

    got, want = run(go())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["unknown session", "bad pusher", "malformed next hop", "no side channel",
                                  "too many"])
def test_a_bad_link_gets_an_error_reply_and_the_session_goes_on(full, case):
    async def go():
        h = await Harness(full).start(direct=case != "no side channel")
        sid = await h.open()
        me = h.server.peer_id
        hop = wire.NextHop("", os.urandom(16), 2, 4)
        if case == "too many":        # each may dial a peer the client names: a bounded number
            for _ in range(chain.MAX_LINKS):
                await h.call(wire.RPC_LINK, wire.LinkRequest(sid, pusher=me), wire.LinkReply)
        req = {"too many": wire.LinkRequest(sid, pusher=me),
               "unknown session": wire.LinkRequest(os.urandom(16), pusher=me),
               "bad pusher": wire.LinkRequest(sid, pusher="a b"),
               "malformed next hop": wire.LinkRequest(sid, next_hop=hop),
               "no side channel": wire.LinkRequest(sid, pusher=me)}[case]
        with pytest.raises(RemoteError):
            await h.call(wire.RPC_LINK, req, wire.LinkReply)
        good = torch.randn(1, 1, D)
        return await h.step(sid, good, 0), full.run_blocks(good, start=0, end=2)

    got, want = run(go())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_link_to_an_unreachable_next_hop_leaves_a_session_that_does_not_push(full):
    async def go():
        h = await Harness(full).start(direct=True)
        sid = await h.open()
        hop = wire.NextHop(h.client.peer_id, os.urandom(16), 2, 4)        # announces no side channel
        linked = await h.call(wire.RPC_LINK, wire.LinkRequest(sid, next_hop=hop), wire.LinkReply)
        good = torch.randn(1, 1, D)
        reply = await h.call(wire.RPC_STEP, wire.StepRequest(sid, 0, 2, 0, good, push=True), wire.StepReply)
        return linked.pushes, reply.pushed, reply.hidden, full.run_blocks(good, start=0, end=2)

    pushes, pushed, got, want = run(go())
    assert not pushes and not pushed
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_refused_push_ends_the_link_and_later_pushes_report_they_could_not_leave(full):
    async def go():
        h = await Harness(full).start(direct=True)
        a, b = await h.open(), os.urandom(16)
        opened = await h.call(wire.RPC_OPEN, wire.OpenRequest(b, 0, 2, 1, 16, pusher=h.server.peer_id),
                              wire.OpenReply)
        hop = wire.NextHop(h.server.peer_id, b, 0, 2, endpoint=opened.endpoint)
        assert (await h.call(wire.RPC_LINK, wire.LinkRequest(a, next_hop=hop), wire.LinkReply)).pushes
        link = h.host.sessions[(h.client.peer_id, a)].next
        await h.call(wire.RPC_CLOSE, wire.CloseRequest(b), wire.CloseReply)    # b is gone: its pushes are refused
        good = torch.randn(1, 1, D)
        first = await h.call(wire.RPC_STEP, wire.StepRequest(a, 0, 2, 0, good, push=True), wire.StepReply)
        await asyncio.wait_for(link.conn.closed.wait(), 10)                      # the refusal closed the link
        second = await h.call(wire.RPC_STEP, wire.StepRequest(a, 0, 2, 1, good, push=True), wire.StepReply)
        return first.pushed, second.pushed

    assert run(go()) == (True, False)


def test_the_admit_hook_refuses_a_session_or_caps_its_new_tokens(full):
    seen = []

    async def admit(peer_id, ticket, batch, max_length, load):
        seen.append((ticket, batch, max_length, load))
        if ticket != b"ok":
            raise AccessRefused(f"{wire.ACCESS_REFUSED}: no quota left; renews in 10 s")
        return 4                                       # new tokens per row after the first step

    async def go():
        h = await Harness(full).start()
        h.host.admit = admit
        with pytest.raises(RemoteError, match="access refused: no quota left"):
            await h.call(wire.RPC_OPEN, wire.OpenRequest(os.urandom(16), 0, 2, 1, 16, ticket=b"no"), wire.OpenReply)
        assert h.host.n_sessions == 0
        capped, fits = os.urandom(16), os.urandom(16)
        for sid in (capped, fits):
            await h.call(wire.RPC_OPEN, wire.OpenRequest(sid, 0, 2, 1, 8, ticket=b"ok"), wire.OpenReply)
        with pytest.raises(RemoteError, match="admitted for 4 new tokens"):
            await h.step(capped, torch.randn(1, 2, D), 0)          # a 2-token prompt leaves 6 positions
        await h.step(fits, torch.randn(1, 4, D), 0)                  # a 4-token prompt leaves 4
        return seen

    seen = run(go())
    assert [s[:3] for s in seen] == [(b"no", 1, 16), (b"ok", 1, 8), (b"ok", 1, 8)]
