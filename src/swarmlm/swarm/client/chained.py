"""Chained steps: a decoding step sent to every server of a session's chain at once.

Where every server was reached directly and the chain was opened back to front (each server
told how to reach the next, wire.py's `NextHop`), a step is chained: sent to every hop at once,
the first with the hidden states, each server pushing its outputs to the next itself. The
client still receives every hop's outputs (the next hop's inputs, kept for replay). When a hop
fails, the steps still waiting for its push are called off and `ChainBroken` says where: the
session (session.py) fails over and goes on hop by hop from there.

A step that says more will follow (`more=True`, as the decode loop's do) sends the next step's
request to each hop but the first as soon as the hop before it has replied (the server reads it
once it has answered this one, then waits for the push), so the next step only has to reach the
first hop. A next step that cannot use them (another position, a key mask) calls them off first.

`ChainedSteps` is handed its hops (hops.py's `HopState`s, in chain order) with each call and
talks to them through a `HopClient` (hops.py); what it owns is the requests sent ahead. It knows
nothing of failover, routing or the session's state.
"""

from __future__ import annotations

import asyncio

import torch

from swarmlm.errors import PeerError
from swarmlm.swarm.client.hops import HopClient, HopState, as_dtype, checked_output


class ChainBroken(Exception):
    """Hop `index` of a chained step failed with `cause`; `x` is its input (in its dtype), recorded by
    the hops before it."""

    def __init__(self, index: int, x: torch.Tensor, cause: PeerError):
        super().__init__(str(cause))
        self.index = index
        self.x = x
        self.cause = cause


class ChainedSteps:
    def __init__(self, calls: HopClient):
        self.calls = calls
        self.ahead: tuple[int, list[asyncio.Future]] | None = None  # (position, steps sent to hops[1:] for it)
        self.relays = 0               # outputs the client delivered itself because a push did not leave

    async def step(self, hops: list[HopState], x: torch.Tensor, key_mask: torch.Tensor | None, *,
                   ahead: list[asyncio.Future] | None, more: bool) -> torch.Tensor:
        """The step sent to every hop at once: the first gets the hidden states, each pushes its outputs
        to the next, and each replies here (its outputs are the next hop's recorded inputs). On a
        failure the hops still waiting for a push are called off and `ChainBroken` is raised.
        `ahead`: the later hops' requests, already sent (`take_ahead`). `more`: the next step's request
        to each later hop leaves once the hop before it has replied (while that hop computes this
        step: the server reads it when done, and then waits for the next push)."""
        position, last = hops[0].length, len(hops) - 1
        # last hop first: the first hop's request wakes a server that may take this very core, so it
        # leaves once everything else is sent (the others only start waiting for their pushes)
        tasks = (ahead or self._send_waiting(hops, position, key_mask)) + [self.calls.send_step(
            hops[0], self.calls.step_request(hops[0], position, as_dtype(x, hops[0].dtype), key_mask=key_mask, push=True))]
        tasks = tasks[-1:] + tasks[:-1]
        following: list[asyncio.Future] = []          # the next step's, to hops[1:]
        after = position + x.shape[1]
        try:
            for i, state in enumerate(hops):
                x_in = as_dtype(x, state.dtype)
                try:
                    reply = await tasks[i]
                    y = checked_output(reply.hidden, x_in, state.hop)
                except PeerError as e:
                    await self.call_off(hops[1:1 + len(following)], following, after)
                    await self.call_off(hops[i + 1:], tasks[i + 1:], position)
                    raise ChainBroken(i, x_in, e) from None
                state.record(x_in, key_mask)
                if i < last and not reply.pushed:     # the push did not leave: deliver it ourselves
                    self.relays += 1
                    await self.calls.deliver(hops[i + 1], position, as_dtype(y, hops[i + 1].dtype))
                if more and i < last:
                    following.append(self._send_waiting_to(hops, i + 1, after, None))
                x = y
            if more:
                self.ahead = (after, following)
            return x
        finally:
            for task in tasks:
                task.cancel()                         # only the ones still running: none on success

    def _send_waiting(self, hops: list[HopState], position: int,
                      key_mask: torch.Tensor | None) -> list[asyncio.Future]:
        """The requests of a chained step at `position` to every hop but the first, last hop first."""
        return [self._send_waiting_to(hops, i, position, key_mask) for i in reversed(range(1, len(hops)))][::-1]

    def _send_waiting_to(self, hops: list[HopState], i: int, position: int,
                         key_mask: torch.Tensor | None) -> asyncio.Future:
        """Hop i's request of a chained step at `position`: it waits at the server for hop i-1's push."""
        return self.calls.send_step(hops[i], self.calls.step_request(hops[i], position, None, key_mask=key_mask,
                                                                     push=i < len(hops) - 1))

    async def take_ahead(self, hops: list[HopState], key_mask: torch.Tensor | None, *,
                         chained: bool) -> list[asyncio.Future] | None:
        """The later hops' requests sent ahead for this step (at `hops`' position), if it can use them
        (`chained`: it goes to every hop at once); else they are called off."""
        if self.ahead is None:
            return None
        (position, tasks), self.ahead = self.ahead, None
        if chained and position == hops[0].length and key_mask is None and not any(t.done() for t in tasks):
            return tasks
        await self.call_off(hops[1:], tasks, position)      # a task already done is only awaited
        return None

    async def call_off(self, states: list[HopState], tasks: list[asyncio.Future], position: int) -> None:
        """End the steps of `states` still waiting for a push, and wait for all of theirs to settle
        (a hop that already ran is run again, hop by hop: a step at `position` trims its cache back)."""
        for state, task in zip(states, tasks):
            if not task.done():
                await self.calls.deliver(state, position, None)
        await asyncio.gather(*tasks, return_exceptions=True)

    async def cancel(self) -> None:
        """Drop the requests sent ahead (the session is closing: their channels close next)."""
        if self.ahead is not None:
            (_, tasks), self.ahead = self.ahead, None
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
