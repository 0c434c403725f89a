"""InferenceSession: one client's decoding session across a chain of servers, surviving their loss.

The session holds, per hop of its chain, the server's session id, a steps channel (one
long-lived connection, so a step costs one frame each way instead of a unary call: an
encrypted direct TCP connection where the server offers one and it can be dialed, else a
libp2p stream) and every input it sent that hop (one tensor per step). A step sends only the new positions' hidden
states, hop by hop. When a hop fails (its peer vanishes, times out or answers an error), the session asks
for a replacement chain for that hop's span, banning the failed peer, opens sessions there
and replays the recorded inputs in one request cut into the original steps' sizes (`chunks`),
so the new servers' caches, and every later output, are bit for bit what the lost server's
would have been. Then the step goes on. With no replacement the `Swarm` raises
`NotFoundError` naming the uncovered blocks after a bounded wait.

Where every server was reached directly and the chain was opened back to front (each server
told how to reach the next, wire.py's `NextHop`), a step is chained instead (client/chained.py).
A failover re-links such a chain: the replacement is opened back to front too, pushing into the
server after it (which is told to take pushes from it), and the server before it is told to push
into the replacement (`RPC_LINK`). A link that cannot be made leaves the chain stepping
hop by hop.

Each step tells a server how many positions it should already hold (`position`); a server
that ran a step whose reply got lost trims back to it, so a retried step is never counted
twice. Knows nothing of the DHT or of Peer types: it talks to a `Swarm` (client/remote.py).
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol

import torch

from swarmlm import serialize
from swarmlm.errors import PeerError, SwarmError
from swarmlm.log import get_logger
from swarmlm.swarm import wire
from swarmlm.swarm.client.chained import ChainedSteps
from swarmlm.swarm.client.routing import Hop

logger = get_logger(__name__)


class Swarm(Protocol):
    """What a session needs from the swarm (client/remote.py's RemoteBlocks provides it)."""

    async def route(self, start: int, end: int, *, banned: set[str], need_cache_tokens: int = 0,
                    wait_s: float | None = None) -> list[Hop]: ...

    async def call(self, peer_id: str, name: str, request: Any, reply_cls: type, *, timeout_s: float) -> Any: ...

    async def open_channel(self, peer_id: str, name: str, *, timeout_s: float) -> Any: ...

    async def open_direct_channel(self, peer_id: str, endpoint: bytes, *, timeout_s: float) -> Any: ...

    async def call_channel(self, channel: Any, request: Any, reply_cls: type, *, timeout_s: float) -> Any: ...

    def send_channel(self, channel: Any, request: Any, reply_cls: type, *, timeout_s: float) -> Awaitable[Any]: ...

    def dtype_of(self, peer_id: str) -> torch.dtype: ...

    def session_opened(self, peer_id: str, delta: int) -> None: ...


@dataclass(frozen=True)
class SessionOptions:
    step_timeout_s: float = 30.0          # one step at one server (SIGKILL is noticed far sooner: the stream resets)
    open_timeout_s: float = 10.0          # opening a session at one server
    recovery_timeout_s: float = 25.0      # the longest one failover may take before the step fails
    replacement_wait_s: float = 10.0      # how long to wait for a server for a lost span to appear
    max_replay_bytes: int = 12 << 20      # cut a replay into several requests above this
    direct: bool = True                   # step over servers' side channels (p2p/channel/) where they have one
    direct_timeout_s: float = 3.0         # dialing it; a server that cannot be dialed is stepped over libp2p
    chain: bool = True                    # servers push outputs to the next server (wire.py's chained steps)


@dataclass
class _HopState:
    hop: Hop
    session_id: bytes
    dtype: torch.dtype
    channel: Any = None                  # the steps channel (p2p/rpc.py's Channel), or None: unary steps
    next_hop: wire.NextHop | None = None  # how the server before this one reaches it (direct servers only)
    pushes: bool = False                 # this server pushes its outputs to the next one when asked
    inputs: list[torch.Tensor] = field(default_factory=list)         # per step: (B, T_i, D)
    masks: list[torch.Tensor | None] = field(default_factory=list)   # per step: (B, T_i) or None
    length: int = 0                                                  # sum of T_i: positions the server holds

    def record(self, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        self.inputs.append(x)
        self.masks.append(mask)
        self.length += x.shape[1]


class InferenceSession(ChainedSteps):
    """Build with `await InferenceSession.create(swarm, start, end, batch=, max_length=)`."""

    def __init__(self, swarm: Swarm, start: int, end: int, *, batch: int, max_length: int,
                 prompts: torch.Tensor | None, options: SessionOptions):
        self.swarm = swarm
        self.start, self.end = start, end
        self.batch = batch
        self.max_length = max_length
        self.prompts = prompts            # (end-start, B or 1, P, D) deep prompts, or None
        self.options = options
        self.hops: list[_HopState] = []
        self.banned: set[str] = set()
        self.recoveries = 0               # failovers so far
        self.last_failure: str | None = None
        self.closed = False
        self.chained = options.chain      # steps go to every hop at once (off while a failover re-links)
        self.chained_steps = 0            # steps that went to every hop at once
        self._ahead: tuple[int, list[asyncio.Future]] | None = None  # (position, steps sent to hops[1:] for it)

    @classmethod
    async def create(cls, swarm: Swarm, start: int, end: int, *, batch: int, max_length: int,
                     prompts: torch.Tensor | None = None, options: SessionOptions | None = None) -> "InferenceSession":
        self = cls(swarm, start, end, batch=batch, max_length=max_length, prompts=prompts,
                   options=options or SessionOptions())
        deadline = time.monotonic() + self.options.recovery_timeout_s
        self.hops = await self._open_chain(start, end, deadline=deadline, history=None)
        return self

    @property
    def position(self) -> int:
        """Positions every server of the chain holds."""
        return self.hops[0].length if self.hops else 0

    @property
    def chain(self) -> list[Hop]:
        return [s.hop for s in self.hops]

    async def step(self, hidden: torch.Tensor, key_mask: torch.Tensor | None = None, *,
                   more: bool = False) -> torch.Tensor:
        """Run the new positions hidden (B, T, D) through [start, end) -> (B, T, D). `more`: another
        step (without a key mask) follows at once; its requests to the later hops leave now."""
        if self.closed:
            raise SwarmError("this inference session is closed")
        B, T, _ = hidden.shape
        if B != self.batch:
            raise ValueError(f"the session has {self.batch} rows, the step {B}")
        if self.position + T > self.max_length:
            raise ValueError(f"the session holds at most {self.max_length} positions; {self.position} + {T} is more")
        first = self.position == 0
        ahead = await self._take_ahead(key_mask)
        if self._can_chain(first):
            return (await self._step_chained(hidden, key_mask, ahead=ahead, more=more)).to(hidden.dtype)
        return (await self._run_from(0, hidden, key_mask, first=first)).to(hidden.dtype)

    async def _run_from(self, i: int, x: torch.Tensor, key_mask: torch.Tensor | None, *, first: bool,
                        failed: PeerError | None = None) -> torch.Tensor:
        """The step from hop i on, hop by hop (replacing hop i first if it `failed`)."""
        if failed is not None:
            await self._recover(i, failed)
        while i < len(self.hops):
            state = self.hops[i]
            x_in = x.to(state.dtype)
            req = wire.StepRequest(session_id=state.session_id, start=state.hop.start, end=state.hop.end,
                                   position=state.length, hidden=x_in, key_mask=key_mask,
                                   prompts=self._prompts_for(state) if first else None)
            try:
                reply = await self._call_step(state, req)
                y = self._checked_output(reply.hidden, x_in, state.hop)
            except PeerError as e:
                await self._recover(i, e)
                continue                  # the same position of the chain, now held by the replacement
            state.record(x_in, key_mask)
            x, i = y, i + 1
        return x

    async def close(self) -> None:
        """Free the servers' caches (best effort: a server that is gone frees it on its idle timeout)."""
        if self.closed:
            return
        self.closed = True
        if self._ahead is not None:
            for task in self._ahead[1]:
                task.cancel()                  # their channels close below
            await asyncio.gather(*self._ahead[1], return_exceptions=True)
            self._ahead = None
        for state in self.hops:
            self.swarm.session_opened(state.hop.peer_id, -1)
            _close_channel(state)
            try:
                await self.swarm.call(state.hop.peer_id, wire.RPC_CLOSE, wire.CloseRequest(state.session_id),
                                      wire.CloseReply, timeout_s=2.0)
            except PeerError as e:
                logger.debug("closing a session at %s: %s", state.hop.peer_id, e)

    # ---- failover -------------------------------------------------------------------------------------

    async def _recover(self, i: int, error: PeerError) -> None:
        """Replace hop i by a new chain for its span whose caches hold the same history."""
        failed = self.hops[i]
        logger.warning("server %s (blocks %d:%d) failed: %s; replacing it", failed.hop.peer_id, failed.hop.start,
                       failed.hop.end, error)
        self.banned.add(failed.hop.peer_id)
        self.last_failure = f"{failed.hop.peer_id}: {error}"
        self.swarm.session_opened(failed.hop.peer_id, -1)
        _close_channel(failed)
        deadline = time.monotonic() + self.options.recovery_timeout_s
        before = self.hops[i - 1] if i > 0 else None
        after = self.hops[i + 1] if i + 1 < len(self.hops) else None
        link = self.options.chain and self.options.direct
        takes_pushes = after is not None and after.next_hop is not None     # its server has a side channel
        into = (lambda pusher: self._expect_pusher(after, pusher)) if link and takes_pushes else None
        replaced = await self._open_chain(failed.hop.start, failed.hop.end, deadline=deadline,
                                          history=(failed.inputs, failed.masks), link=link, next_hop=into,
                                          pushed_by=before.hop.peer_id if link and before is not None else None)
        self.hops[i:i + 1] = replaced
        if before is not None:
            before.pushes = link and await self._push_to(before, replaced[0].next_hop)
        self.recoveries += 1
        self.chained = link              # _can_chain still asks every link and channel

    async def _expect_pusher(self, state: _HopState, pusher: str) -> wire.NextHop | None:
        """Tell `state`'s server that `pusher` (a replacement) will push into it: how to reach it
        (None where it cannot be: a failure here shows in its next step)."""
        reply = await self._link(state, wire.LinkRequest(session_id=state.session_id, pusher=pusher),
                                 "cannot take pushes from a replacement")
        return None if reply is None else state.next_hop

    async def _push_to(self, state: _HopState, hop: wire.NextHop | None) -> bool:
        """Have `state`'s server push its outputs to `hop` from now on; whether it can."""
        if hop is None:
            return False
        reply = await self._link(state, wire.LinkRequest(session_id=state.session_id, next_hop=hop),
                                 "cannot push to its replaced next server")
        return reply is not None and reply.pushes

    async def _link(self, state: _HopState, req: wire.LinkRequest, failing: str) -> wire.LinkReply | None:
        """`req` to `state`'s server; None (logged) if it fails."""
        try:
            return await self.swarm.call(state.hop.peer_id, wire.RPC_LINK, req, wire.LinkReply,
                                         timeout_s=self.options.open_timeout_s)
        except PeerError as e:
            logger.info("%s %s: %s", state.hop.peer_id, failing, e)
            return None

    async def _open_chain(self, start: int, end: int, *, deadline: float,
                          history: tuple[list[torch.Tensor], list[torch.Tensor | None]] | None,
                          link: bool | None = None,
                          next_hop: Callable[[str], Awaitable[wire.NextHop | None]] | None = None,
                          pushed_by: str | None = None) -> list[_HopState]:
        """Open sessions on a chain covering [start, end) and replay `history` into them, retrying on
        failures. `link`: each server is told the next (default: the session chains); `next_hop`: where
        the last one pushes, asked anew for each try with the peer that will push there (the server
        after it must take pushes from that one); `pushed_by`: the server before the first, which will
        push into it."""
        link = self.chained if link is None else link
        while True:
            wait_s = min(self.options.replacement_wait_s, max(0.0, deadline - time.monotonic()))
            hops = await self.swarm.route(start, end, banned=self.banned,
                                          need_cache_tokens=self.batch * self.max_length, wait_s=wait_s)
            states: list[_HopState] = []
            tail = await next_hop(hops[-1].peer_id) if link and next_hop is not None else None
            try:
                for j in reversed(range(len(hops))):        # back to front: each server learns the next
                    nxt = (states[0].next_hop if states else tail) if link else None
                    pusher = (hops[j - 1].peer_id if j > 0 else pushed_by) if link else None
                    states.insert(0, await self._open(hops[j], next_hop=nxt, pusher=pusher))
                if history is not None and history[0]:
                    await self._replay(states, *history)
                return states
            except _HopFailed as e:
                logger.warning("replacement server %s failed: %s", e.peer_id, e)
                self.banned.add(e.peer_id)
                self.last_failure = f"{e.peer_id}: {e}"
                for st in states:
                    self.swarm.session_opened(st.hop.peer_id, -1)
                    _close_channel(st)
                if time.monotonic() > deadline:
                    raise

    async def _open(self, hop: Hop, *, next_hop: wire.NextHop | None = None, pusher: str | None = None) -> _HopState:
        """Open a session at `hop`, with a steps channel: over its side channel where the server has
        one, else its libp2p channel, else none (unary steps). `next_hop`: where the server pushes its
        outputs; `pusher`: the server before it, which will push into it."""
        session_id = os.urandom(wire.SESSION_ID_BYTES)
        req = wire.OpenRequest(session_id=session_id, start=hop.start, end=hop.end, batch=self.batch,
                               max_length=self.max_length, pusher=pusher, next_hop=next_hop)
        timeout_s = self.options.open_timeout_s
        try:
            opened = await self.swarm.call(hop.peer_id, wire.RPC_OPEN, req, wire.OpenReply, timeout_s=timeout_s)
            dtype = serialize.parse_dtype(opened.dtype)
        except serialize.WireError as e:
            raise _HopFailed(hop.peer_id, PeerError(f"{hop.peer_id} answered open with a bad dtype: {e}")) from None
        except PeerError as e:
            raise _HopFailed(hop.peer_id, e) from None
        self.swarm.session_opened(hop.peer_id, +1)
        channel = None
        direct = self.options.direct and opened.endpoint is not None
        if direct:
            try:
                channel = await self.swarm.open_direct_channel(hop.peer_id, opened.endpoint,
                                                               timeout_s=self.options.direct_timeout_s)
            except PeerError as e:
                logger.info("no direct channel to %s (%s); steps go over libp2p", hop.peer_id, e)
        if channel is None:
            try:
                channel = await self.swarm.open_channel(hop.peer_id, wire.RPC_STEPS, timeout_s=timeout_s)
            except PeerError as e:
                logger.debug("no steps channel to %s (%s); steps go by unary calls", hop.peer_id, e)
        here = (wire.NextHop(peer_id=hop.peer_id, session_id=session_id, start=hop.start, end=hop.end,
                             endpoint=opened.endpoint) if direct else None)
        return _HopState(hop, session_id, dtype, channel, next_hop=here, pushes=next_hop is not None and opened.pushes)

    async def _call_step(self, state: _HopState, req: wire.StepRequest) -> wire.StepReply:
        """One step at one server: on its channel, or as a unary call where there is none."""
        if state.channel is not None:
            return await self.swarm.call_channel(state.channel, req, wire.StepReply,
                                                 timeout_s=self.options.step_timeout_s)
        return await self.swarm.call(state.hop.peer_id, wire.RPC_STEP, req, wire.StepReply,
                                     timeout_s=self.options.step_timeout_s)

    def _send_step(self, state: _HopState, req: wire.StepRequest) -> asyncio.Future:
        """`_call_step` as a task; on a channel the request is written before this returns."""
        if state.channel is not None:
            return asyncio.ensure_future(self.swarm.send_channel(state.channel, req, wire.StepReply,
                                                                 timeout_s=self.options.step_timeout_s))
        return asyncio.ensure_future(self._call_step(state, req))

    async def _replay(self, states: list[_HopState], inputs: list[torch.Tensor],
                      masks: list[torch.Tensor | None]) -> None:
        """Feed the recorded inputs through the new hops, in the original step sizes."""
        sizes = [x.shape[1] for x in inputs]
        xs = list(inputs)
        for state in states:
            outs: list[torch.Tensor] = []
            for group in _groups(xs, self.options.max_replay_bytes):
                x = torch.cat([xs[j] for j in group], dim=1).to(state.dtype)  # (B, sum T_j, D)
                mask = _cat_masks([masks[j] for j in group], [sizes[j] for j in group], self.batch)
                req = wire.StepRequest(session_id=state.session_id, start=state.hop.start, end=state.hop.end,
                                       position=sum(sizes[:group[0]]), hidden=x, key_mask=mask,
                                       prompts=self._prompts_for(state) if group[0] == 0 else None,
                                       chunks=[sizes[j] for j in group])
                try:
                    reply = await self._call_step(state, req)
                    y = self._checked_output(reply.hidden, x, state.hop)
                except PeerError as e:
                    raise _HopFailed(state.hop.peer_id, e) from None
                outs.extend(torch.split(y, [sizes[j] for j in group], dim=1))
                for x_j, j in zip(torch.split(x, [sizes[j] for j in group], dim=1), group):
                    state.record(x_j, masks[j])
            xs = outs

    def _prompts_for(self, state: _HopState) -> torch.Tensor | None:
        if self.prompts is None:
            return None
        return self.prompts[state.hop.start - self.start:state.hop.end - self.start].to(state.dtype)

    @staticmethod
    def _checked_output(y: Any, x: torch.Tensor, hop: Hop) -> torch.Tensor:
        try:
            serialize.check_tensor(y, name="hidden", dtype=x.dtype, shape=tuple(x.shape), finite=True)
        except serialize.WireError as e:
            raise PeerError(f"{hop.peer_id} returned bad hidden states for blocks {hop.start}:{hop.end}: {e}") from None
        return y


class _HopFailed(PeerError):
    """A PeerError that remembers which peer it came from."""

    def __init__(self, peer_id: str, cause: PeerError):
        super().__init__(str(cause))
        self.peer_id = peer_id


def _close_channel(state: _HopState) -> None:
    if state.channel is not None:
        state.channel.close()


def _groups(xs: list[torch.Tensor], max_bytes: int) -> list[list[int]]:
    """Consecutive indices of `xs` packed into groups of at most `max_bytes` (one item may exceed it alone)."""
    groups: list[list[int]] = []
    size = 0
    for j, x in enumerate(xs):
        n = x.numel() * x.element_size()
        if groups and size + n <= max_bytes:
            groups[-1].append(j)
            size += n
        else:
            groups.append([j])
            size = n
    return groups


def _cat_masks(masks: list[torch.Tensor | None], sizes: list[int], batch: int) -> torch.Tensor | None:
    if all(m is None for m in masks):
        return None
    return torch.cat([m if m is not None else torch.ones(batch, n, dtype=torch.bool)
                      for m, n in zip(masks, sizes)], dim=1)  # (B, sum T_j)
