"""One client session's hops: what it holds per server of its chain, and how it talks to each.

- `HopState`: per hop, the server's session id, its steps channel (one long-lived connection,
  so a step costs one frame each way instead of a unary call: over the server's side channel
  where it offers one and it can be dialed, else a libp2p stream, else none), how the server
  before it reaches it (`next_hop`), whether it pushes to the next, and every input it was sent
  (one tensor per step), kept for a replay.
- `HopClient`: the calls to one hop: open a session there, send a step on its channel (or as a
  unary call), deliver or call off a pushed input, and replay recorded inputs in one request
  cut into the original steps' sizes (`chunks`), so a replacement's cache, and every later
  output, is bit for bit what the lost server's would have been.

Knows nothing of failover or of the order of hops: session.py and chained.py decide those.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from swarmlm import serialize
from swarmlm.errors import AccessRefused, PeerError, RemoteError
from swarmlm.log import get_logger
from swarmlm.swarm import wire
from swarmlm.swarm.client.routing import Hop

if TYPE_CHECKING:
    from swarmlm.swarm.client.session import SessionOptions, Swarm

logger = get_logger(__name__)


@dataclass
class HopState:
    hop: Hop
    session_id: bytes
    dtype: torch.dtype
    channel: Any = None                  # the steps channel (p2p/rpc.py's Channel), or None: unary steps
    next_hop: wire.NextHop | None = None  # how the server before this one reaches it (direct servers only)
    pushes: bool = False                 # this server pushes its outputs to the next one when asked
    lane: Any = None                     # client/fast.py's FastHop on a direct channel, else None
    inputs: list[torch.Tensor] = field(default_factory=list)         # per step: (B, T_i, D)
    masks: list[torch.Tensor | None] = field(default_factory=list)   # per step: (B, T_i) or None
    length: int = 0                                                  # sum of T_i: positions the server holds

    def record(self, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        self.inputs.append(x)
        self.masks.append(mask)
        self.length += x.shape[1]

    def close_channel(self) -> None:
        if self.channel is not None:
            self.channel.close()


class HopFailed(PeerError):
    """A PeerError that remembers which peer it came from."""

    def __init__(self, peer_id: str, cause: PeerError):
        super().__init__(str(cause))
        self.peer_id = peer_id


class HopClient:
    """The calls one session makes to its hops: `batch` rows, at most `max_length` positions,
    deep `prompts` (end-start, B or 1, P, D) for blocks [start, ...) or None."""

    def __init__(self, swarm: Swarm, options: SessionOptions, *, batch: int, max_length: int,
                 start: int, prompts: torch.Tensor | None):
        self.swarm = swarm
        self.options = options
        self.batch = batch
        self.max_length = max_length
        self.start = start
        self.prompts = prompts

    async def open(self, hop: Hop, *, next_hop: wire.NextHop | None = None, pusher: str | None = None) -> HopState:
        """Open a session at `hop`, with a steps channel: over its side channel where the server has
        one, else its libp2p channel, else none (unary steps). `next_hop`: where the server pushes its
        outputs; `pusher`: the server before it, which will push into it. `HopFailed` if it fails."""
        session_id = os.urandom(wire.SESSION_ID_BYTES)
        ticket = self.options.ticket(hop.peer_id, self.batch, self.max_length) if self.options.ticket else None
        req = wire.OpenRequest(session_id=session_id, start=hop.start, end=hop.end, batch=self.batch,
                               max_length=self.max_length, pusher=pusher, next_hop=next_hop, ticket=ticket)
        timeout_s = self.options.open_timeout_s
        try:
            opened = await self.swarm.call(hop.peer_id, wire.RPC_OPEN, req, wire.OpenReply, timeout_s=timeout_s)
            dtype = serialize.parse_dtype(opened.dtype)
        except serialize.WireError as e:
            raise HopFailed(hop.peer_id, PeerError(f"{hop.peer_id} answered open with a bad dtype: {e}")) from None
        except RemoteError as e:
            if wire.ACCESS_REFUSED in str(e):       # a policy's answer, not a failure: no other server is tried
                raise AccessRefused(str(e)) from None
            raise HopFailed(hop.peer_id, e) from None
        except PeerError as e:
            raise HopFailed(hop.peer_id, e) from None
        if ticket is not None and self.options.ticket_accepted is not None:
            self.options.ticket_accepted(hop.peer_id)
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
        return HopState(hop, session_id, dtype, channel, next_hop=here, pushes=next_hop is not None and opened.pushes)

    def forget(self, state: HopState) -> None:
        """Stop using `state`'s session (lost, or never finished opening): its load and channel."""
        self.swarm.session_opened(state.hop.peer_id, -1)
        state.close_channel()

    async def close(self, state: HopState) -> None:
        """Free the server's cache (best effort: a server that is gone frees it on its idle timeout)."""
        self.forget(state)
        try:
            await self.swarm.call(state.hop.peer_id, wire.RPC_CLOSE, wire.CloseRequest(state.session_id),
                                  wire.CloseReply, timeout_s=2.0)
        except PeerError as e:
            logger.debug("closing a session at %s: %s", state.hop.peer_id, e)

    async def link(self, state: HopState, req: wire.LinkRequest, failing: str) -> wire.LinkReply | None:
        """`req` (RPC_LINK) to `state`'s server; None (logged as `failing`) if it fails."""
        try:
            return await self.swarm.call(state.hop.peer_id, wire.RPC_LINK, req, wire.LinkReply,
                                         timeout_s=self.options.open_timeout_s)
        except PeerError as e:
            logger.info("%s %s: %s", state.hop.peer_id, failing, e)
            return None

    # ---- steps ------------------------------------------------------------------------------------------

    def step_request(self, state: HopState, position: int, hidden: torch.Tensor | None, *,
                     key_mask: torch.Tensor | None = None, first: bool = False, push: bool = False,
                     chunks: list[int] | None = None) -> wire.StepRequest:
        """A step at `state`'s server from `position` on (`first`: it carries the deep prompts)."""
        return wire.StepRequest(session_id=state.session_id, start=state.hop.start, end=state.hop.end,
                                position=position, hidden=hidden, key_mask=key_mask,
                                prompts=self.prompts_for(state) if first else None, chunks=chunks, push=push)

    async def call_step(self, state: HopState, req: wire.StepRequest) -> wire.StepReply:
        """One step at one server: on its channel, or as a unary call where there is none."""
        if state.channel is not None:
            return await self.swarm.call_channel(state.channel, req, wire.StepReply,
                                                 timeout_s=self.options.step_timeout_s)
        return await self.swarm.call(state.hop.peer_id, wire.RPC_STEP, req, wire.StepReply,
                                     timeout_s=self.options.step_timeout_s)

    def send_step(self, state: HopState, req: wire.StepRequest) -> asyncio.Future:
        """`call_step` as a task; on a channel the request is written before this returns."""
        if state.channel is not None:
            return asyncio.ensure_future(self.swarm.send_channel(state.channel, req, wire.StepReply,
                                                                 timeout_s=self.options.step_timeout_s))
        return asyncio.ensure_future(self.call_step(state, req))

    async def deliver(self, state: HopState, position: int, hidden: torch.Tensor | None) -> None:
        """The input of `state`'s step at `position`, which waits for a push (None: call it off), by a
        unary call. A failure here shows as that hop's own step failing."""
        req = wire.StepRequest(session_id=state.session_id, start=state.hop.start, end=state.hop.end,
                               position=position, hidden=hidden, pushed=True)
        try:
            await self.swarm.call(state.hop.peer_id, wire.RPC_STEP, req, wire.StepReply,
                                  timeout_s=self.options.open_timeout_s)
        except PeerError as e:
            logger.debug("push to %s: %s", state.hop.peer_id, e)

    async def replay(self, states: list[HopState], inputs: list[torch.Tensor],
                     masks: list[torch.Tensor | None]) -> None:
        """Feed the recorded inputs through the new hops, in the original step sizes (`HopFailed` if
        one fails)."""
        sizes = [x.shape[1] for x in inputs]
        xs = list(inputs)
        for state in states:
            outs: list[torch.Tensor] = []
            for group in replay_groups([x.numel() * x.element_size() for x in xs], self.options.max_replay_bytes):
                x = torch.cat([xs[j] for j in group], dim=1).to(state.dtype)  # (B, sum T_j, D)
                mask = _cat_masks([masks[j] for j in group], [sizes[j] for j in group], self.batch)
                req = self.step_request(state, sum(sizes[:group[0]]), x, key_mask=mask, first=group[0] == 0,
                                        chunks=[sizes[j] for j in group])
                try:
                    reply = await self.call_step(state, req)
                    y = checked_output(reply.hidden, x, state.hop)
                except PeerError as e:
                    raise HopFailed(state.hop.peer_id, e) from None
                outs.extend(torch.split(y, [sizes[j] for j in group], dim=1))
                for x_j, j in zip(torch.split(x, [sizes[j] for j in group], dim=1), group):
                    state.record(x_j, masks[j])
            xs = outs

    def prompts_for(self, state: HopState) -> torch.Tensor | None:
        if self.prompts is None:
            return None
        return self.prompts[state.hop.start - self.start:state.hop.end - self.start].to(state.dtype)


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t.to(dtype)` without the torch call where it is one already (~20 us on a decoding step's cold caches)."""
    return t if t.dtype == dtype else t.to(dtype)


def checked_output(y: Any, x: torch.Tensor, hop: Hop) -> torch.Tensor:
    """A hop's outputs for inputs `x`, checked (`PeerError` naming the hop if they are not hidden states like x)."""
    try:
        serialize.check_tensor(y, name="hidden", dtype=x.dtype, shape=tuple(x.shape), finite=True)
    except serialize.WireError as e:
        raise PeerError(f"{hop.peer_id} returned bad hidden states for blocks {hop.start}:{hop.end}: {e}") from None
    return y


def replay_groups(sizes: list[int], max_bytes: int) -> list[list[int]]:
    """How a replay is cut into requests: consecutive indices of the recorded steps (of `sizes` bytes each)
    packed into groups of at most `max_bytes` (one step may exceed it alone). Pure: the simulator uses it too."""
    groups: list[list[int]] = []
    size = 0
    for j, n in enumerate(sizes):
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
