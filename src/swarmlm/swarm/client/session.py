"""InferenceSession: one client's decoding session across a chain of servers, surviving their loss.

The session holds a `HopState` per hop of its chain (hops.py: the server's session id, its steps
channel, every input it was sent) and goes through named states (states.py): OPENING its chain,
then stepping CHAINED or HOP_BY_HOP, and on a failure RECOVERING, REPLAYING and RELINKING.

A step sends only the new positions' hidden states. Where every server was reached directly and
the chain was opened back to front (each server told how to reach the next, wire.py's `NextHop`),
the session is CHAINED and a step goes to every hop at once (client/chained.py); else it goes hop
by hop. When a hop fails (its peer vanishes, times out or answers an error), the session asks for
a replacement chain for that hop's span, banning the failed peer, opens sessions there back to
front (the server after it told to take pushes from the replacement), replays the recorded inputs
(so the new servers' caches, and every later output, are bit for bit what the lost server's would
have been), and has the server before it push into the replacement (`RPC_LINK`). Then the step
goes on, hop by hop; the next is chained again if every link was made. With no replacement the
`Swarm` raises `NotFoundError` naming the uncovered blocks after a bounded wait.

Each step tells a server how many positions it should already hold (`position`); a server
that ran a step whose reply got lost trims back to it, so a retried step is never counted
twice. Knows nothing of the DHT or of Peer types: it talks to a `Swarm` (client/remote.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol

import torch

from swarmlm.errors import AccessRefused, PeerError, UserError
from swarmlm.log import get_logger
from swarmlm.swarm import fast as fast_lane, wire
from swarmlm.swarm.client.chained import ChainBroken, ChainedSteps
from swarmlm.swarm.client.fast import FastHop, FastRefused, FastSteps
from swarmlm.swarm.client.hops import HopClient, HopFailed, HopState, as_dtype, checked_output
from swarmlm.swarm.client.routing import Hop
from swarmlm.swarm.client.states import READY, SessionState, StepMode, StepRecord, check_stage, check_transition

logger = get_logger(__name__)
S = SessionState


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

    def peer_failed(self, peer_id: str) -> None: ...


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
    fast: bool = True                     # chained one-token steps as fast-lane records (swarm/fast.py)
    ticket: Callable[[str, int, int], bytes | None] | None = None   # (server peer ID, batch, max_length) -> the
                                          # OpenRequest.ticket for it (cli.py hands the ledger's); None: no tickets
    ticket_accepted: Callable[[str], None] | None = None            # told which server took its ticket


History = tuple[list[torch.Tensor], list[torch.Tensor | None]]   # a hop's recorded inputs and key masks


class InferenceSession:
    """Build with `await InferenceSession.create(swarm, start, end, batch=, max_length=)`."""

    def __init__(self, swarm: Swarm, start: int, end: int, *, batch: int, max_length: int,
                 prompts: torch.Tensor | None, options: SessionOptions):
        self.swarm = swarm
        self.start, self.end = start, end
        self.batch = batch
        self.max_length = max_length
        self.prompts = prompts            # (end-start, B or 1, P, D) deep prompts, or None
        self.options = options
        self.calls = HopClient(swarm, options, batch=batch, max_length=max_length, start=start, prompts=prompts)
        self._chained = ChainedSteps(self.calls)
        self._fast: FastSteps | None = None    # made at the first fast step (it needs the width)
        self.hops: list[HopState] = []
        self.banned: set[str] = set()
        self.state = S.OPENING
        self.history: list[SessionState] = [S.OPENING]    # every state entered (a step is none)
        self.entered_at: list[float] = [time.perf_counter()]  # when each was entered: a failover's phases
        self.step_log: list[StepRecord] = []              # how each step went
        self.recoveries = 0               # failovers so far
        self.last_failure: str | None = None

    @classmethod
    async def create(cls, swarm: Swarm, start: int, end: int, *, batch: int, max_length: int,
                     prompts: torch.Tensor | None = None, options: SessionOptions | None = None) -> "InferenceSession":
        self = cls(swarm, start, end, batch=batch, max_length=max_length, prompts=prompts,
                   options=options or SessionOptions())
        deadline = time.monotonic() + self.options.recovery_timeout_s
        self.hops = await self._open_chain(start, end, deadline=deadline, history=None, link=self.options.chain)
        self._enter(self._steps_state())
        return self

    # ---- what it holds, and its state ---------------------------------------------------------------

    @property
    def position(self) -> int:
        """Positions every server of the chain holds."""
        return self.hops[0].length if self.hops else 0

    @property
    def chain(self) -> list[Hop]:
        return [s.hop for s in self.hops]

    @property
    def closed(self) -> bool:
        return self.state is S.CLOSED

    @property
    def chained(self) -> bool:
        """Steps go to every hop at once (once closed: they did when it closed)."""
        return next((s for s in reversed(self.history) if s in READY), None) is S.CHAINED

    @property
    def fast_steps(self) -> int:
        """Chained steps that went by the fast lane (swarm/fast.py)."""
        return 0 if self._fast is None else self._fast.steps

    @property
    def fast_relays(self) -> int:
        """Outputs of fast steps the client relayed to the next hop because a push did not leave."""
        return 0 if self._fast is None else self._fast.relays

    @property
    def chained_steps(self) -> int:
        """Steps that went to every hop at once."""
        return sum(r.mode is StepMode.CHAINED for r in self.step_log)

    def _enter(self, state: SessionState) -> None:
        check_transition(self.state, state)
        if state is not self.state:
            self.history.append(state)
            self.entered_at.append(time.perf_counter())
        self.state = state

    def _steps_state(self) -> SessionState:
        """How steps can go on the chain as it is now linked."""
        linked = (self.options.chain and len(self.hops) > 1 and all(st.channel is not None for st in self.hops)
                  and all(st.pushes for st in self.hops[:-1]))
        return S.CHAINED if linked else S.HOP_BY_HOP

    # ---- steps ----------------------------------------------------------------------------------------

    async def step(self, hidden: torch.Tensor, key_mask: torch.Tensor | None = None, *,
                   more: bool = False) -> torch.Tensor:
        """Run the new positions hidden (B, T, D) through [start, end) -> (B, T, D). `more`: another
        step (without a key mask) follows at once; its requests to the later hops leave now."""
        check_transition(self.state, self.state)          # a step: only on an open, idle session
        B, T, _ = hidden.shape
        if B != self.batch:
            raise ValueError(f"the session has {self.batch} rows, the step {B}")
        if self.position + T > self.max_length:
            raise ValueError(f"the session holds at most {self.max_length} positions; {self.position} + {T} is more")
        position = self.position
        first = position == 0
        chained = self.state is S.CHAINED and not (first and self.prompts is not None)  # prompts go hop by hop
        lanes = chained and all(st.lane is not None for st in self.hops)
        fast = (lanes and T == 1 and key_mask is None and not first and B <= fast_lane.MAX_ROWS
                and (self._fast is None or self._fast.refused < fast_lane.MAX_REFUSALS))
        ahead = (None if self._chained.ahead is None else      # (a coroutine less on a decoding step's cold caches)
                 await self._chained.take_ahead(self.hops, key_mask, chained=chained and not fast))
        recoveries = self.recoveries
        if fast:
            if self._fast is None:
                self._fast = FastSteps(batch=B, dim=hidden.shape[2], timeout_s=self.options.step_timeout_s)
            try:
                y = await self._fast.step(self.hops, hidden)
            except ChainBroken as e:
                y = await self._run_from(e.index, e.x, key_mask, first=first, failed=e.cause)
            except FastRefused as e:                  # that hop takes the step the slow way
                logger.info("fast step refused: %s", e)
                y = await self._run_from(e.index, e.x, key_mask, first=first)
        else:
            if self._fast is not None:
                self._fast.armed = False              # a slow step disarms the servers' fast waits
            if chained:
                try:                                  # with lanes the next step is fast: nothing goes ahead
                    y = await self._chained.step(self.hops, hidden, key_mask, ahead=ahead, more=more and not lanes)
                except ChainBroken as e:
                    y = await self._run_from(e.index, e.x, key_mask, first=first, failed=e.cause)
            else:
                y = await self._run_from(0, hidden, key_mask, first=first)
        mode = (StepMode.FAILED_OVER if self.recoveries > recoveries else
                StepMode.CHAINED if chained else StepMode.HOP_BY_HOP)
        self.step_log.append(StepRecord(position, T, mode))
        return as_dtype(y, hidden.dtype)

    async def _run_from(self, i: int, x: torch.Tensor, key_mask: torch.Tensor | None, *, first: bool,
                        failed: PeerError | None = None) -> torch.Tensor:
        """The step from hop i on, hop by hop (replacing hop i first if it `failed`)."""
        if failed is not None:
            _not_the_hops_fault(self.hops[i], x, failed)
            await self._recover(i, failed)
        while i < len(self.hops):
            state = self.hops[i]
            x_in = as_dtype(x, state.dtype)
            req = self.calls.step_request(state, state.length, x_in, key_mask=key_mask, first=first)
            try:
                reply = await self.calls.call_step(state, req)
                y = checked_output(reply.hidden, x_in, state.hop)
            except PeerError as e:
                _not_the_hops_fault(state, x_in, e)
                await self._recover(i, e)
                continue                  # the same position of the chain, now held by the replacement
            state.record(x_in, key_mask)
            x, i = y, i + 1
        return x

    async def close(self) -> None:
        """Free the servers' caches (best effort: a server that is gone frees it on its idle timeout)."""
        if self.state is S.CLOSED:
            return
        self._enter(S.CLOSED)
        await self._chained.cancel()                         # their channels close below
        for state in self.hops:
            await self.calls.close(state)

    # ---- failover -------------------------------------------------------------------------------------

    async def _recover(self, i: int, error: PeerError) -> None:
        """Replace hop i by a new chain for its span whose caches hold the same history, and re-link the
        chain around it. A failover that fails leaves the session HOP_BY_HOP (a later step fails over again)."""
        self._enter(S.RECOVERING)
        failed = self.hops[i]
        logger.warning("server %s (blocks %d:%d) failed: %s; replacing it", failed.hop.peer_id, failed.hop.start,
                       failed.hop.end, error)
        self.banned.add(failed.hop.peer_id)
        self.swarm.peer_failed(failed.hop.peer_id)          # later sessions avoid it too, until it answers again
        self.last_failure = f"{failed.hop.peer_id}: {error}"
        self.calls.forget(failed)
        deadline = time.monotonic() + self.options.recovery_timeout_s
        before = self.hops[i - 1] if i > 0 else None
        after = self.hops[i + 1] if i + 1 < len(self.hops) else None
        link = self.options.chain and self.options.direct
        takes_pushes = after is not None and after.next_hop is not None     # its server has a side channel
        into = (lambda pusher: self._expect_pusher(after, pusher)) if link and takes_pushes else None
        try:
            replaced = await self._open_chain(failed.hop.start, failed.hop.end, deadline=deadline,
                                              history=(failed.inputs, failed.masks), link=link, next_hop=into,
                                              pushed_by=before.hop.peer_id if link and before is not None else None)
        except BaseException:
            if self.state is not S.CLOSED:
                self._enter(S.HOP_BY_HOP)
            raise
        self.hops[i:i + 1] = replaced
        self.recoveries += 1
        self._enter(S.RELINKING)
        if before is not None:
            before.pushes = link and await self._push_to(before, replaced[0].next_hop)
        self._enter(self._steps_state())

    async def _expect_pusher(self, state: HopState, pusher: str) -> wire.NextHop | None:
        """Tell `state`'s server that `pusher` (a replacement) will push into it: how to reach it
        (None where it cannot be: a failure here shows in its next step)."""
        check_stage(self.state, S.RECOVERING, "telling a server who will push into it")
        reply = await self.calls.link(state, wire.LinkRequest(session_id=state.session_id, pusher=pusher),
                                      "cannot take pushes from a replacement")
        return None if reply is None else state.next_hop

    async def _push_to(self, state: HopState, hop: wire.NextHop | None) -> bool:
        """Have `state`'s server push its outputs to `hop` from now on; whether it can."""
        check_stage(self.state, S.RELINKING, "re-linking a server to a replacement")
        if hop is None:
            return False
        reply = await self.calls.link(state, wire.LinkRequest(session_id=state.session_id, next_hop=hop),
                                      "cannot push to its replaced next server")
        return reply is not None and reply.pushes

    async def _open_chain(self, start: int, end: int, *, deadline: float, history: History | None, link: bool,
                          next_hop: Callable[[str], Awaitable[wire.NextHop | None]] | None = None,
                          pushed_by: str | None = None) -> list[HopState]:
        """Open sessions on a chain covering [start, end) and replay `history` into them, retrying on
        failures. `link`: each server is told the next; `next_hop`: where the last one pushes, asked
        anew for each try with the peer that will push there (the server after it must take pushes
        from that one); `pushed_by`: the server before the first, which will push into it."""
        while True:
            wait_s = min(self.options.replacement_wait_s, max(0.0, deadline - time.monotonic()))
            hops = await self.swarm.route(start, end, banned=self.banned,
                                          need_cache_tokens=self.batch * self.max_length, wait_s=wait_s)
            states: list[HopState] = []
            tail = await next_hop(hops[-1].peer_id) if link and next_hop is not None else None
            try:
                for j in reversed(range(len(hops))):        # back to front: each server learns the next
                    nxt = (states[0].next_hop if states else tail) if link else None
                    pusher = (hops[j - 1].peer_id if j > 0 else pushed_by) if link else None
                    states.insert(0, await self.calls.open(hops[j], next_hop=nxt, pusher=pusher))
                    if self.options.fast and states[0].next_hop is not None:     # a direct channel
                        states[0].lane = FastHop.of(states[0].channel, states[0].session_id, hops[j].peer_id)
                if history is not None and history[0]:
                    self._enter(S.REPLAYING)
                    await self.calls.replay(states, *history)
                return states
            except AccessRefused:
                for st in states:                      # a policy refused one hop: free the others' caches
                    await self.calls.close(st)
                raise
            except HopFailed as e:
                logger.warning("replacement server %s failed: %s", e.peer_id, e)
                self.banned.add(e.peer_id)
                self.last_failure = f"{e.peer_id}: {e}"
                for st in states:
                    self.calls.forget(st)
                if self.state is S.REPLAYING:
                    self._enter(S.RECOVERING)
                if time.monotonic() > deadline:
                    raise


def _not_the_hops_fault(state: HopState, x: torch.Tensor, error: PeerError) -> None:
    """A hop that failed a step whose inputs hold NaN or infinity refused them (every server checks its
    inputs or its outputs): they are the caller's own (a hop's outputs reach the next hop only once
    checked, by this client or by the server that computed them), so the step fails with a UserError
    and the hop is not replaced. Checked only once a hop failed: off the decoding path."""
    if not bool(torch.isfinite(x).all()):
        raise UserError(f"the hidden states for blocks {state.hop.start}:{state.hop.end} hold NaN or infinity "
                        f"(refused by {state.hop.peer_id}: {error})")
