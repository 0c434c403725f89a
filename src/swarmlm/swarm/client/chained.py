"""Chained steps: a decoding step sent to every server of a session's chain at once.

Where every server was reached directly and the chain was opened back to front (each server
told how to reach the next, wire.py's `NextHop`), a step is chained: sent to every hop at once,
the first with the hidden states, each server pushing its outputs to the next itself. The
client still receives every hop's outputs (the next hop's inputs, kept for replay); when a hop
fails, the steps still waiting for its push are called off and the step goes on hop by hop from
there (session.py's failover, which re-links the chain around the replacement, so the next step
is chained again).

A step that says more will follow (`more=True`, as the decode loop's do) sends the next step's
request to each hop but the first as soon as the hop before it has replied (the server reads it
once it has answered this one, then waits for the push), so the next step only has to reach the
first hop. A next step that cannot use them (another position, a key mask) calls them off first.

`ChainedSteps` is the part of `InferenceSession` (session.py) that does this; it uses the
session's hops, channels and failover.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import torch

from swarmlm.errors import PeerError
from swarmlm.log import get_logger
from swarmlm.swarm import wire

if TYPE_CHECKING:
    from swarmlm.swarm.client.session import _HopState

logger = get_logger(__name__)


class ChainedSteps:
    """Mixed into `InferenceSession`: needs its `hops`, `position`, `chained`, `prompts`, `swarm`,
    `options`, `_ahead` and its `_send_step`, `_checked_output` and `_run_from`."""

    hops: list[Any]
    chained: bool
    chained_steps: int
    _ahead: tuple[int, list[asyncio.Future]] | None

    def _can_chain(self, first: bool) -> bool:
        return (self.chained and len(self.hops) > 1 and not (first and self.prompts is not None)
                and all(st.channel is not None for st in self.hops) and all(st.pushes for st in self.hops[:-1]))

    async def _step_chained(self, x: torch.Tensor, key_mask: torch.Tensor | None, *,
                            ahead: list[asyncio.Future] | None, more: bool) -> torch.Tensor:
        """The step sent to every hop at once: the first gets the hidden states, each pushes its outputs
        to the next, and each replies here (its outputs are the next hop's recorded inputs). On a
        failure the hops still waiting for a push are called off and the step goes on hop by hop.
        `ahead`: the later hops' requests, already sent. `more`: the next step's request to each later
        hop leaves once the hop before it has replied (while that hop computes this step: the
        server reads it when done, and then waits for the next push)."""
        hops, position, last = list(self.hops), self.position, len(self.hops) - 1
        # last hop first: the first hop's request wakes a server that may take this very core, so it
        # leaves once everything else is sent (the others only start waiting for their pushes)
        tasks = (ahead or self._send_waiting(position, key_mask)) + [
            self._send_step(hops[0], wire.StepRequest(
                session_id=hops[0].session_id, start=hops[0].hop.start, end=hops[0].hop.end, position=position,
                hidden=x.to(hops[0].dtype), key_mask=key_mask, push=True))]
        tasks = tasks[-1:] + tasks[:-1]
        following: list[asyncio.Future] = []          # the next step's, to hops[1:]
        after = position + x.shape[1]
        try:
            for i, state in enumerate(hops):
                x_in = x.to(state.dtype)
                try:
                    reply = await tasks[i]
                    y = self._checked_output(reply.hidden, x_in, state.hop)
                except PeerError as e:
                    self.chained = False
                    await self._call_off(hops[1:1 + len(following)], following, after)
                    await self._call_off(hops[i + 1:], tasks[i + 1:], position)
                    return await self._run_from(self.hops.index(state), x_in, key_mask, first=position == 0, failed=e)
                state.record(x_in, key_mask)
                if i < last and not reply.pushed:     # the push did not leave: deliver it ourselves
                    await self._push(hops[i + 1], position, y.to(hops[i + 1].dtype))
                if more and i < last:
                    following.append(self._send_waiting_to(i + 1, after, None))
                x = y
            if more:
                self._ahead = (after, following)
            self.chained_steps += 1
            return x
        finally:
            for task in tasks:
                task.cancel()                         # only the ones still running: none on success

    def _send_waiting(self, position: int, key_mask: torch.Tensor | None) -> list[asyncio.Future]:
        """The requests of a chained step at `position` to every hop but the first, last hop first."""
        return [self._send_waiting_to(i, position, key_mask) for i in reversed(range(1, len(self.hops)))][::-1]

    def _send_waiting_to(self, i: int, position: int, key_mask: torch.Tensor | None) -> asyncio.Future:
        """Hop i's request of a chained step at `position`: it waits at the server for hop i-1's push."""
        st = self.hops[i]
        return self._send_step(st, wire.StepRequest(
            session_id=st.session_id, start=st.hop.start, end=st.hop.end, position=position,
            hidden=None, key_mask=key_mask, push=i < len(self.hops) - 1))

    async def _take_ahead(self, key_mask: torch.Tensor | None) -> list[asyncio.Future] | None:
        """The later hops' requests sent ahead for this step, if it can use them; else they are called off."""
        if self._ahead is None:
            return None
        (position, tasks), self._ahead = self._ahead, None
        if (position == self.position and key_mask is None and self._can_chain(False)
                and not any(t.done() for t in tasks)):
            return tasks
        await self._call_off(self.hops[1:], tasks, position)      # a task already done is only awaited
        return None

    async def _push(self, state: _HopState, position: int, hidden: torch.Tensor | None) -> None:
        """Deliver the input of `state`'s waiting step (None: call it off), by a unary call. A failure here
        shows as that hop's own step failing."""
        req = wire.StepRequest(session_id=state.session_id, start=state.hop.start, end=state.hop.end,
                               position=position, hidden=hidden, pushed=True)
        try:
            await self.swarm.call(state.hop.peer_id, wire.RPC_STEP, req, wire.StepReply,
                                  timeout_s=self.options.open_timeout_s)
        except PeerError as e:
            logger.debug("push to %s: %s", state.hop.peer_id, e)

    async def _call_off(self, states: list[_HopState], tasks: list[asyncio.Future], position: int) -> None:
        """End the steps of `states` still waiting for a push, and wait for all of theirs to settle
        (a hop that already ran is run again, hop by hop: a step at `position` trims its cache back)."""
        for state, task in zip(states, tasks):
            if not task.done():
                await self._push(state, position, None)
        await asyncio.gather(*tasks, return_exceptions=True)
