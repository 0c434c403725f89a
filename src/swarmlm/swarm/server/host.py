"""BlockHost: serves a span of a model's blocks to swarm clients.

It owns the loaded blocks (frozen), one KV cache per inference session, and the `Budget`
that bounds them. Its `rpc_*` methods are the handlers of wire.py's RPCs; each checks every
field it is sent (span, session, shapes, dtypes, sizes, token limits) and raises a typed
error, which the peer turns into an error reply (or an error frame on a steps channel), so a
bad request never disturbs the other sessions. Tensor work runs on one worker thread, so the
event loop stays free for the DHT and for other requests, and requests run one at a time
there; only short decoding steps (`INLINE_STEP_TOKENS`) run on the loop itself.

Sessions belong to the peer that opened them: the key is (caller's peer ID, session id).
The stateless forward and backward are answered by a `StatelessSpans` (spans.py) the host builds
for the model it serves, handing it the model, the request checks (checks.py), the kept forwards,
its worker thread and its clock.
Knows nothing of the DHT or of routing: server/announce.py publishes what `record()` says.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import torch

from swarmlm import __version__, serialize
from swarmlm.errors import AccessRefused, CapacityError, PeerError, WireError
from swarmlm.log import get_logger
from swarmlm.model.cache import KVCache
from swarmlm.model.quant import quantization_of
from swarmlm.model.transformer import Transformer
from swarmlm.p2p import rpc
from swarmlm.p2p.channel.policy import DialLimiter
from swarmlm.p2p.channel.service import EndpointRefused
from swarmlm.p2p.rpc import message_handler, serve_channel
from swarmlm.swarm import wire
from swarmlm.swarm.blocks import run_span
from swarmlm.swarm.dht import ServerRecord
from swarmlm.swarm.server.budget import Budget, BudgetLimits
from swarmlm.swarm.server.chain import (
    DIAL_WINDOW_S,
    MAX_DIALS_PER_PEER,
    MAX_LINKS,
    Inbox,
    NextLink,
    check_next_hop,
    check_peer_id,
)
from swarmlm.swarm.server import metrics
from swarmlm.swarm.server.checks import RequestChecks
from swarmlm.swarm.server.fast import FastLane
from swarmlm.swarm.server.pushes import serve_pushes
from swarmlm.swarm.server.saved import SavedForwards
from swarmlm.swarm.server.spans import StatelessSpans

logger = get_logger(__name__)

# A decoding step of at most this many new tokens (B * T) runs on the event loop itself: it is
# short, and handing it to the worker thread and back costs two thread wake-ups (0.2-0.4 ms
# each on a loaded 2-core machine), a large share of a step's time beyond its compute.
INLINE_STEP_TOKENS = 16
# admit(client peer ID, OpenRequest.ticket, batch, max_length, load 0..1) -> per-row cap on the tokens the
# session may generate after its first step (None: no cap); raises AccessRefused (a one-line reason)
Admit = Callable[[str, "bytes | None", int, int, float], Awaitable["int | None"]]
MAX_SESSIONS_PER_PEER = 64      # open sessions of one client (closing one frees its place)
_NOTHING = torch.empty(0)       # the hidden states of a reply to a pushed input


@dataclass
class _Session:
    start: int
    end: int
    batch: int
    max_length: int
    cache: KVCache
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    inbox: Inbox = field(default_factory=Inbox)       # inputs pushed by the previous server
    next: NextLink | None = None                      # where outputs are pushed when a step asks
    pusher: str | None = None                         # the peer the client allows to push into it
    links: int = 0                                    # re-links asked for so far (MAX_LINKS)
    token_cap: int | None = None                      # per row, new positions after the first step (admit's grant)
    fast_io: Any = None                               # the fast lane's input and output buffers (server/fast.py)

    def close(self) -> None:
        self.inbox.close()
        if self.next is not None:
            self.next.close()


class BlockHost:
    def __init__(self, model: Transformer, *, model_id: str, limits: BudgetLimits | None = None,
                 block_tokens_per_s: float = 0.0, clock: Callable[[], float] = time.monotonic,
                 admit: Admit | None = None):
        self.model_id = model_id
        self.admit = admit                    # admission policy (cli.py hands the ledger's); None: admit everyone
        self.budget = Budget(limits or BudgetLimits())
        self.tokens_served = 0            # token positions run by inference steps (announced: a counter)
        self.state = "joining"
        self.clock = clock
        self.on_change: Callable[[], None] = lambda: None   # the announcer's poke
        self.sessions: dict[tuple[str, bytes], _Session] = {}
        self.fast = FastLane(self)            # chained one-token steps (server/fast.py)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="swarm-compute")
        self.side: Any = None                 # the peer's side channel (p2p/channel/), once registered with one
        self.dials = DialLimiter(max_dials=MAX_DIALS_PER_PEER, window_s=DIAL_WINDOW_S, clock=clock)
        self.kept = SavedForwards(max_bytes=self.budget.limits.max_kept_bytes,
                                  max_age_s=self.budget.limits.kept_timeout_s)
        self.swap(model, block_tokens_per_s)

    def swap(self, model: Transformer, block_tokens_per_s: float) -> None:
        """Serve `model`'s blocks from now on (a `--num-blocks` server moving); open sessions are dropped."""
        span = model.layer_range
        if not len(span):
            raise ValueError("a BlockHost needs at least one block")
        for key in list(self.sessions):
            self._drop(key)
        self.model = model.eval().requires_grad_(False)
        self.cfg = model.cfg
        self.start, self.end = span.start, span.stop
        self.dtype = next(model.parameters()).dtype
        self.block_tokens_per_s = block_tokens_per_s
        self.checks = RequestChecks(self.start, self.end, self.dtype, self.cfg.dim, self.budget)
        self.kept.clear()
        self.spans = StatelessSpans(self.model, checks=self.checks, kept=self.kept, run=self._run,
                                    clock=lambda: self.clock())     # the host's clock as it is then

    # ---- life cycle ---------------------------------------------------------------------------

    async def register(self, peer: Any, *, side: Any = None) -> None:
        """Add this host's handlers to `peer`; with `side` (the peer's side channel), also serve steps
        channels and pushes over it."""
        limit = self.max_request_bytes()
        handlers = {
            wire.RPC_OPEN: (wire.OpenRequest, self.rpc_open),
            wire.RPC_STEP: (wire.StepRequest, self.rpc_step),
            wire.RPC_CLOSE: (wire.CloseRequest, self.rpc_close),
            wire.RPC_FORWARD: (wire.SpanForwardRequest, self.rpc_forward),
            wire.RPC_BACKWARD: (wire.SpanBackwardRequest, self.rpc_backward),
            wire.RPC_INFO: (wire.InfoRequest, self.rpc_info),
            wire.RPC_LINK: (wire.LinkRequest, self.rpc_link),
        }
        for name, (cls, fn) in handlers.items():
            handler = metrics.counted(name, message_handler(cls, fn, max_request_bytes=limit))
            await peer.add_handler(name, handler, max_request_bytes=limit)
        step = metrics.counted(wire.RPC_STEPS, message_handler(wire.StepRequest, self.rpc_step, max_request_bytes=limit))

        async def serve_steps(peer_id: str, reader: Any, writer: Any) -> None:
            await serve_channel(step, peer_id, reader, writer, name=wire.RPC_STEPS, max_request_bytes=limit,
                                idle_timeout_s=self.budget.limits.idle_timeout_s)

        await peer.add_raw_stream_handler(wire.RPC_STEPS, serve_steps)
        if side is not None:
            self.side = side
            record_bytes = rpc.frame_bytes(limit)                                 # a frame a record
            def steps(conn: Any) -> Awaitable[None]:       # the fast lane's records first, rpc frames after
                conn.set_record_handler(self.fast.on_steps(conn))
                return serve_steps(conn.peer_id, conn, conn)
            await side.serve(wire.PURPOSE_STEPS, steps, max_record_bytes=record_bytes)
            await side.serve(wire.PURPOSE_PUSH, lambda conn: serve_pushes(self, conn), max_record_bytes=record_bytes)

    def max_request_bytes(self) -> int:
        """The largest request the limits allow: hidden states plus gradients (or prompts) of one request."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.budget.limits.max_request_tokens * self.cfg.dim * itemsize + (1 << 16)

    def close(self) -> None:
        """Drop every session (and their pushes onward) and stop the worker thread."""
        for session in self.sessions.values():
            session.close()
        self.sessions.clear()
        self.budget.entries.clear()
        self.kept.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def record(self) -> ServerRecord:
        """What to announce now."""
        return ServerRecord(model=self.model_id, start=self.start, end=self.end, state=self.state,
                                 dtype=serialize.dtype_name(self.dtype), block_tokens_per_s=self.block_tokens_per_s,
                                 free_cache_tokens=self.budget.free_tokens, sessions=self.budget.n_sessions,
                                 quantization=quantization_of(self.model), version=__version__,
                                 tokens_served=self.tokens_served)

    def sweep(self) -> int:
        """Close sessions idle past the timeout; returns how many."""
        self.kept.expire(self.clock())
        expired = self.budget.expired(self.clock())
        for key in expired:
            self._drop(key)
        if expired:
            logger.info("closed %d idle sessions", len(expired))
            self.on_change()
        return len(expired)

    async def sweep_forever(self, period_s: float = 5.0) -> None:
        while True:
            await asyncio.sleep(period_s)
            self.sweep()

    @property
    def n_sessions(self) -> int:
        return len(self.sessions)

    # ---- stateless forward and backward (spans.py) -----------------------------------------------------

    async def rpc_forward(self, peer_id: str, req: wire.SpanForwardRequest) -> wire.SpanForwardReply:
        return await self.spans.rpc_forward(peer_id, req)

    async def rpc_backward(self, peer_id: str, req: wire.SpanBackwardRequest) -> wire.SpanBackwardReply:
        return await self.spans.rpc_backward(peer_id, req)

    # ---- inference sessions -----------------------------------------------------------------------

    async def rpc_open(self, peer_id: str, req: wire.OpenRequest) -> wire.OpenReply:
        self.checks.span(req.start, req.end)
        if len(req.session_id) != wire.SESSION_ID_BYTES:
            raise WireError(f"a session id has {wire.SESSION_ID_BYTES} bytes, got {len(req.session_id)}")
        if req.pusher is not None:
            check_peer_id(req.pusher, "pusher")
        if req.next_hop is not None:
            check_next_hop(req.next_hop)
        if req.max_length > self.cfg.context_len:
            raise CapacityError(f"max_length {req.max_length} exceeds the model's context of {self.cfg.context_len}")
        if sum(owner == peer_id for owner, _ in self.sessions) >= MAX_SESSIONS_PER_PEER:
            raise CapacityError(f"{MAX_SESSIONS_PER_PEER} sessions of yours are already open here")
        key = (peer_id, req.session_id)
        cap = None
        if self.admit is not None:
            if req.ticket is not None and len(req.ticket) > wire.MAX_TICKET_BYTES:
                raise WireError(f"a ticket has at most {wire.MAX_TICKET_BYTES} bytes")
            limits = self.budget.limits
            load = max(self.budget.n_sessions / limits.max_sessions,
                       1 - self.budget.free_tokens / limits.max_cache_tokens)
            cap = await self.admit(peer_id, req.ticket, req.batch, req.max_length, load)
        self.budget.reserve(key, batch=req.batch, max_length=req.max_length, now=self.clock())
        try:
            cache = KVCache.empty(self.cfg, req.batch, req.max_length, layers=range(req.start, req.end),
                                  dtype=self.dtype)
        except BaseException:
            self.budget.release(key)
            raise
        session = self.sessions[key] = _Session(req.start, req.end, req.batch, req.max_length, cache,
                                                 pusher=req.pusher, token_cap=cap)
        metrics.sessions_now(len(self.sessions), opened=True)
        self.on_change()
        if req.next_hop is not None:
            try:
                await self._link_next(key, session, req.next_hop)
            except WireError:
                self._drop(key)
                raise
        return wire.OpenReply(session_id=req.session_id, dtype=serialize.dtype_name(self.dtype),
                              endpoint=self.side.sealed_endpoint() if self.side is not None else None,
                              pushes=session.next is not None)

    async def rpc_link(self, peer_id: str, req: wire.LinkRequest) -> wire.LinkReply:
        """Re-chain a session around a replaced server: take pushes from a new pusher, or push to a new next hop."""
        key = (peer_id, req.session_id)
        session = self.sessions.get(key)
        if session is None:
            raise WireError("unknown or closed session")
        if session.links >= MAX_LINKS:
            raise CapacityError(f"a session may be re-linked {MAX_LINKS} times")
        session.links += 1
        if req.pusher is not None:
            check_peer_id(req.pusher, "pusher")
            if self.side is None:
                raise WireError("this server takes no side-channel connections, so nothing can push into it")
            session.pusher = req.pusher
        if req.next_hop is not None:
            check_next_hop(req.next_hop)
            if session.next is not None:
                session.next.close()            # it pushed to the server the client replaced
                session.next = None
            await self._link_next(key, session, req.next_hop)
        return wire.LinkReply(pushes=session.next is not None)

    async def _link_next(self, key: tuple[str, bytes], session: _Session, hop: wire.NextHop) -> None:
        """Dial `hop` as where `session` pushes its outputs; unreachable, it just does not push. A hop
        whose endpoint record is not its own is refused (`WireError`): nothing is dialed."""
        if self.side is None:
            return
        if not self.dials.allow(key[0]):
            logger.info("%s asked for more than %d next-hop dials in %.0f s; this session does not push",
                        key[0], MAX_DIALS_PER_PEER, DIAL_WINDOW_S)
            return
        try:
            link = await NextLink.connect(self.side, hop, owner=key[0], max_response_bytes=1 << 16)
        except EndpointRefused as e:
            raise WireError(f"next hop {hop.peer_id}: {e}") from None
        except PeerError as e:
            logger.info("cannot reach the next hop of a session of %s: %s", key[0], e)
            return
        if self.sessions.get(key) is session and session.next is None:
            session.next = link
        else:
            link.close()                         # the session was closed (or re-linked) while we dialed

    def session(self, key: tuple[str, bytes]) -> _Session:
        """The session `key` (caller's peer ID, session id); `WireError` if there is none."""
        session = self.sessions.get(key)
        if session is None:
            raise WireError("unknown or closed session")
        return session

    async def rpc_step(self, peer_id: str, req: wire.StepRequest) -> wire.StepReply:
        key = (peer_id, req.session_id)
        session = self.session(key)
        if (req.start, req.end) != (session.start, session.end):
            raise WireError(f"session runs blocks {session.start}:{session.end}, step asked for {req.start}:{req.end}")
        if req.pushed:
            return await self._deliver(session, req)
        session.inbox.disarm()                                   # a slow step ends the fast wait
        if req.hidden is None:
            self.check_push_position(session, req.position)     # before a 30 s wait, not after
            hidden = await session.inbox.wait(req.position)      # checked by _deliver when it arrived
        else:
            session.inbox.forget_delivered()
            hidden = self.checks.hidden(req.hidden, batch=session.batch)
        B, T, _ = hidden.shape
        key_mask = self.checks.mask(req.key_mask, B, T)
        prompts = self.checks.prompts(req.prompts, req.start, req.end, B, T)
        chunks = self.checks.chunks(req.chunks, T)
        if prompts is not None and prompts.shape[2] > chunks[0]:
            raise WireError(f"{prompts.shape[2]} deep prompt positions do not fit the first chunk of {chunks[0]}")
        async with session.lock:
            length = session.cache.length
            if req.position > length or req.position < 0:
                raise WireError(f"step at position {req.position}, but the session holds {length} positions")
            if req.position + T > session.max_length:
                raise CapacityError(f"the session allows {session.max_length} positions; "
                                    f"{req.position} + {T} would exceed it")
            if prompts is not None and req.position != 0:
                raise WireError("deep prompts are only accepted at position 0")
            if session.token_cap is not None and req.position == 0 and session.max_length - T > session.token_cap:
                raise AccessRefused(f"{wire.ACCESS_REFUSED}: the session was admitted for {session.token_cap} new "
                                    f"tokens, its {session.max_length} positions allow {session.max_length - T}")
            self.budget.touch(key, self.clock())

            def compute() -> torch.Tensor:
                if req.position < session.cache.length:
                    session.cache.trim(req.position)       # a retried step: forget its first try
                if len(chunks) == 1:                       # a step as sent: no slice (a torch call ~25 us cold)
                    with torch.inference_mode():
                        return run_span(self.model, hidden, req.start, req.end, cache=session.cache,
                                        key_mask=key_mask, prompts=prompts)
                outs, at = [], 0
                with torch.inference_mode():
                    for n in chunks:
                        mask = None if key_mask is None else key_mask[:, at:at + n]
                        outs.append(run_span(self.model, hidden[:, at:at + n], req.start, req.end, cache=session.cache,
                                             key_mask=mask, prompts=prompts if at == 0 else None))
                        at += n
                return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]   # (B, T, D)

            out = compute() if B * T <= INLINE_STEP_TOKENS else await self._run(compute)
        pushed = req.push and session.next is not None and session.next.push(req.position, out)  # written now
        metrics.count_step(B * T)
        self.tokens_served += B * T
        if T > 1 and session.fast_io is None:       # a prompt: one-token steps next (FastLane.prepare)
            asyncio.get_running_loop().call_soon(self.fast.prepare, key)
        return wire.StepReply(hidden=out, pushed=pushed)

    async def _deliver(self, session: _Session, req: wire.StepRequest) -> wire.StepReply:
        """A pushed input: checked now, so a bad one is refused to whoever pushed it. The step waiting
        for it runs before anything else is read from the pusher."""
        if req.hidden is not None:
            self.checks.hidden(req.hidden, batch=session.batch)
        self.check_push_position(session, req.position)
        session.inbox.deliver(req.position, req.hidden)
        await asyncio.sleep(0)
        return wire.StepReply(hidden=_NOTHING)

    @staticmethod
    def check_push_position(session: _Session, position: int) -> None:
        if not 0 <= position < session.max_length:
            raise WireError(f"a pushed input for position {position}; the session allows {session.max_length}")

    async def rpc_close(self, peer_id: str, req: wire.CloseRequest) -> wire.CloseReply:
        closed = self._drop((peer_id, req.session_id))
        if closed:
            self.on_change()
        return wire.CloseReply(closed=closed)

    def _drop(self, key: tuple[str, bytes]) -> bool:
        self.budget.release(key)
        session = self.sessions.pop(key, None)
        if session is not None:
            session.close()
            metrics.sessions_now(len(self.sessions))
        return session is not None

    async def rpc_info(self, peer_id: str, req: wire.InfoRequest) -> wire.InfoReply:
        return wire.InfoReply(model=self.model_id, start=self.start, end=self.end, state=self.state,
                              dtype=serialize.dtype_name(self.dtype), block_tokens_per_s=self.block_tokens_per_s,
                              free_cache_tokens=self.budget.free_tokens, sessions=self.budget.n_sessions,
                              quantization=quantization_of(self.model))

    # ---- the worker thread ---------------------------------------------------------------------------

    async def _run(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)
