"""The client's side of the fast lane (swarm/fast.py): a chained one-token step as raw records.

`FastHop` is one hop's direct steps connection as the lane uses it: its record handler takes the
hop's REPLY or ERROR for the position it expects, in the connection's own callback, and leaves
rpc frames to the hop's `Channel`. `FastSteps.step` sends the first hop a STEP (hidden states,
PUSH) and every later hop a WAIT, then takes the replies in chain order: each hop's outputs are
the next hop's recorded inputs, as in client/chained.py, and where a push did not leave the
client relays the outputs itself as a STEP. A hop that is lost, times out or answers garbage is
`ChainBroken` (the session fails over, as for a chained step); a hop that refuses the step
(an ERROR record: busy, a position it does not hold, ...) is `FastRefused`, and the session
takes the slow path from that hop. Knows nothing of failover or of the session's state.
"""

from __future__ import annotations

import asyncio
from typing import Any

import torch

from swarmlm.errors import PeerError, PeerTimeout, WireError
from swarmlm.swarm import fast
from swarmlm.swarm.client.chained import ChainBroken
from swarmlm.swarm.client.hops import HopState, as_dtype


class FastRefused(Exception):
    """Hop `index` refused a fast step (`x`: its input); nothing ran there."""

    def __init__(self, index: int, x: torch.Tensor, why: str):
        super().__init__(why)
        self.index = index
        self.x = x


class FastHop:
    """Build with `FastHop.of(channel, session_id)`: None where the channel is not a direct one."""

    def __init__(self, conn: Any, session_id: bytes, peer_id: str):
        self.conn = conn
        self.session_id = session_id
        self.peer_id = peer_id
        self._expect: tuple[int, asyncio.Future] | None = None   # (position, its reply's future)
        self._lost: str | None = None
        self.relayed = 0                  # inputs the client delivered here itself (a push did not leave)
        conn.set_record_handler(self._on_record)

    @classmethod
    def of(cls, channel: Any, session_id: bytes, peer_id: str) -> FastHop | None:
        conn = getattr(channel, "reader", None)
        return cls(conn, session_id, peer_id) if hasattr(conn, "set_record_handler") else None

    def expect(self, position: int) -> asyncio.Future:
        """The future of this hop's record for the step at `position` (a PeerError if the hop is lost)."""
        fut = asyncio.get_running_loop().create_future()
        if self._lost is not None:
            fut.set_exception(PeerError(f"{self.peer_id}: {self._lost}"))
        else:
            self._expect = (position, fut)
        return fut

    def forget(self) -> None:
        """Expect nothing (a step given up): a late record is dropped."""
        self._expect = None

    def write(self, record: bytes) -> None:
        try:
            self.conn.write(record)
        except (ConnectionError, RuntimeError) as e:
            self._fail(f"the connection is closed ({e})")

    def _on_record(self, plain: bytes | None) -> bool:
        if plain is None:
            self._fail("the connection was lost")
            return False
        if not fast.is_fast(plain):
            return False                             # an rpc frame: the Channel's
        try:
            kind, flags, session_id, position, payload = fast.parse(plain)
        except WireError as e:
            self._fail(f"a malformed fast-lane record: {e}")
            return True
        if self._expect is None or self._expect[0] != position or session_id != self.session_id:
            return True                              # a reply to a step given up on
        (_, fut), self._expect = self._expect, None
        if not fut.done():
            fut.set_result((kind, flags, payload))
        return True

    def _fail(self, why: str) -> None:
        self._lost = why
        if self._expect is not None:
            (_, fut), self._expect = self._expect, None
            if not fut.done():
                fut.set_exception(PeerError(f"{self.peer_id}: {why}"))


class FastSteps:
    def __init__(self, *, batch: int, dim: int, timeout_s: float):
        self.batch = batch
        self.dim = dim
        self.timeout_s = timeout_s
        self.steps = 0                    # steps that went by the fast lane
        self.armed = False                # the later hops run each push they get (a WAIT armed them)
        self.relays = 0                   # outputs the client relayed because a push did not leave
        self.refused = 0                  # fast steps refused in a row (a session stops at fast.MAX_REFUSALS)

    async def step(self, hops: list[HopState], x: torch.Tensor) -> torch.Tensor:
        """One new position (x: (B, 1, D)) through every hop (each with a `lane`); see the module docstring.
        The later hops are sent a WAIT only when they are not armed already: once armed, a hop runs
        every push it gets, so a steady step is one record out and one record back per hop."""
        position, last = hops[0].length, len(hops) - 1
        lanes: list[FastHop] = [st.lane for st in hops]
        replies = [lane.expect(position) for lane in lanes]
        x_in = as_dtype(x, hops[0].dtype)
        lanes[0].write(fast.record(fast.STEP, lanes[0].session_id, position, fast.tensor_bytes(x_in),
                                   flags=_flags(0, last)))
        if not self.armed:
            self._wait(lanes, position)
        self.armed = False                           # until this step has come through
        expire = asyncio.get_running_loop().call_later(self.timeout_s, _expire, replies, self.timeout_s)
        done = False
        try:
            for i, state in enumerate(hops):
                try:
                    kind, flags, payload = await replies[i]
                    if kind == fast.ERROR:
                        self.refused += 1
                        raise FastRefused(i, x_in, f"{state.hop.peer_id}: {fast.error_text(payload)}")
                    if kind != fast.REPLY:
                        raise PeerError(f"{state.hop.peer_id} answered a fast step with a record of kind {kind}")
                    y = fast.hidden_of(payload, batch=self.batch, dim=self.dim, dtype=x_in.dtype)
                except WireError as e:
                    raise ChainBroken(i, x_in, PeerError(f"{state.hop.peer_id} returned bad hidden states for "
                                                         f"blocks {state.hop.start}:{state.hop.end}: {e}")) from None
                except PeerError as e:
                    raise ChainBroken(i, x_in, e) from None
                state.record(x_in, None)
                if i < last:
                    x_in = as_dtype(y, hops[i + 1].dtype)
                    if not flags & fast.PUSH_FLAG:       # the push did not leave: deliver it ourselves
                        self.relays += 1
                        lanes[i + 1].relayed += 1
                        lanes[i + 1].write(fast.record(fast.STEP, lanes[i + 1].session_id, position,
                                                       fast.tensor_bytes(x_in), flags=_flags(i + 1, last)))
            self.steps += 1
            self.armed, self.refused = True, 0
            done = True
            return y
        finally:
            expire.cancel()
            if not done:                             # done: every reply came, nothing is expected
                for lane, fut in zip(lanes, replies):
                    lane.forget()
                    if not fut.done():
                        fut.cancel()
                    elif not fut.cancelled():
                        fut.exception()              # retrieved: a later hop's loss after an earlier one's

    @staticmethod
    def _wait(lanes: list[FastHop], position: int) -> None:
        """Every hop but the first: the step at `position` takes its input from the previous hop's push."""
        for i in range(1, len(lanes)):
            lanes[i].write(fast.record(fast.WAIT, lanes[i].session_id, position, flags=_flags(i, len(lanes) - 1)))


def _flags(i: int, last: int) -> int:
    """Hop i's flags in a chain whose last hop is `last`: every hop pushes on but the last."""
    return fast.PUSH_FLAG if i < last else 0


def _expire(replies: list[asyncio.Future], timeout_s: float) -> None:
    for fut in replies:
        if not fut.done():
            fut.set_exception(PeerTimeout(f"no fast-lane reply in {timeout_s:.1f} s"))
