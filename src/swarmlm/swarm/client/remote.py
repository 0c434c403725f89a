"""The client's view of the swarm: finding servers, routing, and running spans remotely.

- `find_servers` reads the servers' `ServerRecord`s for every block from the DHT.
- `RemoteBlocks` (async) is the `Swarm` a session talks to: it keeps the server list fresh,
  measures round trips, routes with client/routing.py, opens `InferenceSession`s, and runs
  stateless forward and backward passes over a span with failover (re-routing around a
  failed server and going on from the span it held).
- `SwarmSpan` makes a span a differentiable torch function: forward through the servers, and
  backward asking each server, in reverse order, for the gradients of its inputs and of the
  deep prompts; the servers' blocks stay frozen.

The synchronous `RemoteModel` that behaves like a local model lives in client/model.py.
Knows nothing of how servers compute; it sees wire.py's messages and Peer calls.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import torch

from swarmlm import serialize
from swarmlm.errors import NotFoundError, PeerError, PeerTimeout
from swarmlm.log import get_logger
from swarmlm.p2p.rpc import Channel, call_message, frame_bytes
from swarmlm.swarm import wire
from swarmlm.swarm.client.routing import Hop, ServerInfo, choose_chain, format_blocks, uncovered_blocks
from swarmlm.swarm.client.session import InferenceSession, SessionOptions
from swarmlm.swarm.dht import read_servers

logger = get_logger(__name__)

# a forward's trace, one entry per hop: (hop, its input (B, T, D), keep ids by row chunk (start, stop))
Trace = list[tuple[Hop, torch.Tensor, dict[tuple[int, int], bytes]]]


@dataclass(frozen=True)
class ClientOptions:
    connect_timeout_s: float = 60.0       # wait this long at start for every block to be served
    refresh_s: float = 2.0                # re-read the DHT at most this often while looking for servers
    rpc_timeout_s: float = 120.0          # one forward or backward request
    ping_timeout_s: float = 3.0           # the round-trip measurement of one server
    max_request_bytes: int = 8 << 20      # forward/backward batches are cut into requests of at most this
    max_response_bytes: int = 64 << 20    # the largest reply accepted
    session: SessionOptions = field(default_factory=SessionOptions)


async def find_servers(peer: Any, model_id: str, n_layers: int) -> list[ServerInfo]:
    """Online servers of `model_id`, one `ServerInfo` per peer, from the records of every block."""
    records = await read_servers(peer, model_id, n_layers)
    return [ServerInfo(peer_id, r.start, r.end, r.block_tokens_per_s, r.free_cache_tokens, r.sessions, r.dtype,
                       r.quantization)
            for peer_id, r in records.items() if r.state == "online"]


def other_quantizations(servers: list[ServerInfo], blocks: list[int], quantization: str) -> list[str]:
    """The quantizations other than ours under which some of `blocks` are served (for the error message)."""
    return sorted({s.quantization for s in servers if s.quantization != quantization
                   and any(s.start <= b < s.end for b in blocks)})


class RemoteBlocks:
    """Blocks [0, n_layers) of `model_id` as served by the swarm `peer` belongs to."""

    def __init__(self, peer: Any, model_id: str, n_layers: int, *, options: ClientOptions | None = None,
                 seed: int | None = None, quantization: str = "none"):
        self.peer = peer
        self.model_id = model_id
        self.quantization = quantization        # chain only servers whose weights are quantized so
        self._all_servers: list[ServerInfo] = []  # every online server, whatever its quantization
        self.n_layers = n_layers
        self.options = options or ClientOptions()
        self.rng = random.Random(seed)
        self._servers: list[ServerInfo] = []
        self._read_at = -float("inf")
        self.rtt_s: dict[str, float] = {}
        self.own_load: dict[str, int] = {}
        self.unreachable: set[str] = set()      # failed a session or a ping; avoided until it answers a ping

    # ---- discovery ------------------------------------------------------------------------------

    async def servers(self, *, refresh: bool = False) -> list[ServerInfo]:
        """The online servers, re-read from the DHT when asked or older than `refresh_s`."""
        if refresh or time.monotonic() - self._read_at > self.options.refresh_s:
            self._all_servers = await find_servers(self.peer, self.model_id, self.n_layers)
            self._servers = [s for s in self._all_servers if s.quantization == self.quantization]
            self._read_at = time.monotonic()
            await self._measure_rtts([s.peer_id for s in self._servers])
        return self._servers

    async def _measure_rtts(self, peer_ids: list[str]) -> None:
        todo = [p for p in peer_ids if p not in self.rtt_s or p in self.unreachable]
        if not todo:
            return

        async def ping(pid: str) -> None:
            t0 = time.perf_counter()
            try:
                await self.call(pid, wire.RPC_INFO, wire.InfoRequest(), wire.InfoReply,
                                timeout_s=self.options.ping_timeout_s)
            except PeerError as e:
                logger.info("server %s does not answer: %s", pid, e)
                self.unreachable.add(pid)
                return
            self.rtt_s[pid] = time.perf_counter() - t0
            self.unreachable.discard(pid)

        await asyncio.gather(*(ping(p) for p in todo))

    async def wait_ready(self, timeout_s: float | None = None) -> list[ServerInfo]:
        """Wait until every block is served; `NotFoundError` naming the missing blocks after `timeout_s`."""
        await self.route(0, self.n_layers, banned=set(), wait_s=self.options.connect_timeout_s
                         if timeout_s is None else timeout_s)
        return self._servers

    async def route(self, start: int, end: int, *, banned: set[str], need_cache_tokens: int = 0,
                    wait_s: float | None = None, n_tokens: int = 1) -> list[Hop]:
        """The best chain for [start, end) avoiding `banned`, waiting up to `wait_s` for one to exist."""
        wait_s = self.options.session.replacement_wait_s if wait_s is None else wait_s
        deadline = time.monotonic() + wait_s
        refresh = False
        while True:
            servers = await self.servers(refresh=refresh)
            avoid = banned | self.unreachable
            try:
                return choose_chain(servers, start, end, rtt_s=self.rtt_s, rng=self.rng, n_tokens=n_tokens,
                                    own_load=self.own_load, banned=avoid, need_cache_tokens=need_cache_tokens)
            except NotFoundError as e:
                if time.monotonic() >= deadline:
                    missing = uncovered_blocks(servers, start, end, banned=avoid)
                    what = f"no server holds blocks {format_blocks(missing)}" if missing else str(e)
                    others = other_quantizations(self._all_servers, missing, self.quantization)
                    if others:
                        what = (f"no server holds blocks {format_blocks(missing)} with quantization "
                                f"{self.quantization} (they are served as {', '.join(others)}: a chain never mixes "
                                f"quantizations; ask with --quantize {others[0].split('-')[0]})")
                    raise NotFoundError(f"{what} of model {self.model_id} (waited {wait_s:.0f} s)") from None
            await asyncio.sleep(min(self.options.refresh_s, max(0.05, deadline - time.monotonic())))
            refresh = True

    # ---- calls ----------------------------------------------------------------------------------

    async def call(self, peer_id: str, name: str, request: Any, reply_cls: type, *, timeout_s: float) -> Any:
        return await call_message(self.peer, peer_id, name, request, reply_cls, timeout_s=timeout_s,
                                  max_response_bytes=self.options.max_response_bytes)

    async def open_channel(self, peer_id: str, name: str, *, timeout_s: float) -> Channel:
        """A long-lived request/reply stream to `peer_id`'s channel handler `name`."""
        try:
            reader, writer = await asyncio.wait_for(self.peer.open_raw_stream(peer_id, name), timeout_s)
        except asyncio.TimeoutError:
            raise PeerTimeout(f"{name} at {peer_id}: no stream in {timeout_s:.1f} s") from None
        return Channel(reader, writer, peer_id=peer_id, name=name)

    async def open_direct_channel(self, peer_id: str, endpoint: bytes, *, timeout_s: float) -> Channel:
        """The same channel over this peer's side channel (p2p/channel/), dialed where the server's
        signed `endpoint` record says it listens."""
        side = await self.peer.side_channel()
        conn = await side.open(peer_id, wire.PURPOSE_STEPS, timeout_s=timeout_s, endpoint=endpoint,
                               max_record_bytes=frame_bytes(self.options.max_response_bytes))
        return Channel(conn, conn, peer_id=peer_id, name=f"{wire.RPC_STEPS} (direct)")

    async def call_channel(self, channel: Channel, request: Any, reply_cls: type, *, timeout_s: float) -> Any:
        return await self.send_channel(channel, request, reply_cls, timeout_s=timeout_s)

    def send_channel(self, channel: Channel, request: Any, reply_cls: type, *, timeout_s: float) -> Awaitable[Any]:
        """Write `request` on `channel` now; the result awaits its reply."""
        return channel.send_message(request, reply_cls, timeout_s=timeout_s,
                                    max_response_bytes=self.options.max_response_bytes)

    def dtype_of(self, peer_id: str) -> torch.dtype:
        for s in self._servers:
            if s.peer_id == peer_id:
                return serialize.parse_dtype(s.dtype)
        return torch.float32

    def peer_failed(self, peer_id: str) -> None:
        """A session lost `peer_id`: route around it until a ping at a refresh finds it answering."""
        self.unreachable.add(peer_id)

    def session_opened(self, peer_id: str, delta: int) -> None:
        self.own_load[peer_id] = max(0, self.own_load.get(peer_id, 0) + delta)

    async def open_session(self, *, batch: int, max_length: int, prompts: torch.Tensor | None = None,
                           start: int = 0, end: int | None = None) -> InferenceSession:
        return await InferenceSession.create(self, start, self.n_layers if end is None else end, batch=batch,
                                             max_length=max_length, prompts=prompts, options=self.options.session)

    # ---- stateless forward / backward -------------------------------------------------------------

    async def forward(self, x: torch.Tensor, *, key_mask: torch.Tensor | None = None,
                      prompts: torch.Tensor | None = None, start: int = 0, end: int | None = None,
                      keep: bool = False) -> tuple[torch.Tensor, Trace]:
        """x (B, T, D) through blocks [start, end) -> (output (B, T, D), trace of (hop, its input, kept ids)).

        With `keep` the servers are asked to keep each forward for the backward that follows
        (wire.py's keep_id); the trace remembers the ids per row chunk."""
        end = self.n_layers if end is None else end
        banned: set[str] = set()
        B, T, _ = x.shape
        hops = await self.route(start, end, banned=banned, n_tokens=B * T)
        trace: Trace = []
        out_dtype = x.dtype
        while hops:
            hop = hops[0]
            kept: dict[tuple[int, int], bytes] = {}
            try:
                y = await self._forward_hop(hop, x, key_mask, _slice(prompts, hop, start), kept=kept if keep else None)
            except _Failed as e:
                logger.warning("forward at %s failed: %s; re-routing blocks %d:%d", e.peer_id, e, hop.start, end)
                banned.add(e.peer_id)
                hops = await self.route(hop.start, end, banned=banned, n_tokens=B * T)
                continue
            trace.append((hop, x, kept))
            x = y
            hops = hops[1:]
        return x.to(out_dtype), trace

    async def backward(self, trace: Trace, grad: torch.Tensor, *,
                       key_mask: torch.Tensor | None = None, prompts: torch.Tensor | None = None,
                       start: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gradients w.r.t. the forward's input and its deep prompts, given dLoss/d(output) `grad`."""
        grad_prompts = None if prompts is None else torch.zeros_like(prompts)
        out_dtype = grad.dtype
        banned: set[str] = set()
        for hop, x, kept in reversed(trace):
            try:
                grad, gp = await self._backward_hop(hop, x, grad, key_mask, _slice(prompts, hop, start), kept=kept)
            except _Failed as e:
                logger.warning("backward at %s failed: %s; re-running blocks %d:%d elsewhere", e.peer_id, e,
                               hop.start, hop.end)
                banned.add(e.peer_id)
                grad, gp = await self._backward_rerouted(hop, x, grad, key_mask, prompts, start, banned)
            if grad_prompts is not None and gp is not None:
                grad_prompts[hop.start - start:hop.end - start] += gp.to(grad_prompts.dtype)
        return grad.to(out_dtype), grad_prompts

    async def _backward_rerouted(self, hop: Hop, x: torch.Tensor, grad: torch.Tensor, key_mask: torch.Tensor | None,
                                 prompts: torch.Tensor | None, start: int,
                                 banned: set[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Backward of [hop.start, hop.end) on a new chain: its forward again for the inner inputs, then back."""
        deadline = time.monotonic() + self.options.session.replacement_wait_s
        while True:
            B, T, _ = x.shape
            hops = await self.route(hop.start, hop.end, banned=banned, n_tokens=B * T,
                                    wait_s=max(0.0, deadline - time.monotonic()))
            try:
                inputs, h = [], x
                for sub in hops[:-1]:
                    inputs.append(h)
                    h = await self._forward_hop(sub, h, key_mask, _slice(prompts, sub, start))
                inputs.append(h)
                g, grads = grad, []
                for sub, h in zip(reversed(hops), reversed(inputs)):
                    g, gp = await self._backward_hop(sub, h, g, key_mask, _slice(prompts, sub, start))
                    grads.append(gp)
            except _Failed as e:
                banned.add(e.peer_id)
                continue
            gp = None if prompts is None else torch.cat([p for p in reversed(grads)], dim=0)
            return g, gp

    async def _forward_hop(self, hop: Hop, x: torch.Tensor, key_mask: torch.Tensor | None,
                           prompts: torch.Tensor | None, *, kept: dict[tuple[int, int], bytes] | None = None
                           ) -> torch.Tensor:
        """One hop's forward; with `kept`, asks the server to keep each row chunk's forward and records its id."""
        dtype = self.dtype_of(hop.peer_id)
        outs = []
        for rows in _row_chunks(x, self.options.max_request_bytes, n_tensors=2):
            keep_id = None
            if kept is not None:
                keep_id = kept[(rows.start, rows.stop)] = os.urandom(wire.KEEP_ID_BYTES)
            req = wire.SpanForwardRequest(hop.start, hop.end, x[rows].to(dtype), _rows(key_mask, rows),
                                          _prompt_rows(prompts, rows, dtype), keep_id=keep_id)
            reply = await self._call_hop(hop, wire.RPC_FORWARD, req, wire.SpanForwardReply)
            outs.append(_checked(reply.hidden, req.hidden, hop))
        return torch.cat(outs, dim=0)          # (B, T, D)

    async def _backward_hop(self, hop: Hop, x: torch.Tensor, grad: torch.Tensor, key_mask: torch.Tensor | None,
                            prompts: torch.Tensor | None, *, kept: dict[tuple[int, int], bytes] | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor | None]:
        dtype = self.dtype_of(hop.peer_id)
        grads, grad_prompts = [], None
        for rows in _row_chunks(x, self.options.max_request_bytes, n_tensors=2):
            req = wire.SpanBackwardRequest(hop.start, hop.end, x[rows].to(dtype), grad[rows].to(dtype),
                                           _rows(key_mask, rows), _prompt_rows(prompts, rows, dtype),
                                           keep_id=(kept or {}).get((rows.start, rows.stop)))
            reply = await self._call_hop(hop, wire.RPC_BACKWARD, req, wire.SpanBackwardReply)
            grads.append(_checked(reply.grad_hidden, req.hidden, hop))
            if prompts is not None:
                if reply.grad_prompts is None:
                    raise _Failed(hop.peer_id, PeerError(f"{hop.peer_id} sent no prompt gradients"))
                gp = _checked(reply.grad_prompts, req.prompts, hop)
                if prompts.shape[1] == 1:       # shared by every row: the row chunks' gradients add up
                    grad_prompts = gp if grad_prompts is None else grad_prompts + gp
                else:
                    grad_prompts = gp if grad_prompts is None else torch.cat([grad_prompts, gp], dim=1)
        return torch.cat(grads, dim=0), grad_prompts

    async def _call_hop(self, hop: Hop, name: str, req: Any, reply_cls: type) -> Any:
        try:
            return await self.call(hop.peer_id, name, req, reply_cls, timeout_s=self.options.rpc_timeout_s)
        except PeerError as e:
            raise _Failed(hop.peer_id, e) from None


class _Failed(PeerError):
    def __init__(self, peer_id: str, cause: Exception):
        super().__init__(str(cause))
        self.peer_id = peer_id


def _slice(prompts: torch.Tensor | None, hop: Hop, start: int) -> torch.Tensor | None:
    return None if prompts is None else prompts[hop.start - start:hop.end - start]


def _row_chunks(x: torch.Tensor, max_bytes: int, *, n_tensors: int) -> list[slice]:
    B, T, D = x.shape
    row_bytes = max(1, n_tensors * T * D * 4)
    per = max(1, max_bytes // row_bytes)
    return [slice(i, min(B, i + per)) for i in range(0, B, per)]


def _rows(t: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return None if t is None else t[rows]


def _prompt_rows(prompts: torch.Tensor | None, rows: slice, dtype: torch.dtype) -> torch.Tensor | None:
    if prompts is None:
        return None
    p = prompts if prompts.shape[1] == 1 else prompts[:, rows]
    return p.to(dtype)


def _checked(y: Any, like: torch.Tensor, hop: Hop) -> torch.Tensor:
    try:
        return serialize.check_tensor(y, name="reply", dtype=like.dtype, shape=tuple(like.shape), finite=True)
    except serialize.WireError as e:
        raise _Failed(hop.peer_id, PeerError(f"{hop.peer_id} returned a bad tensor for blocks "
                                             f"{hop.start}:{hop.end}: {e}")) from None


class SwarmSpan(torch.autograd.Function):
    """Blocks [start, end) through the swarm as one differentiable op: (h, prompts) -> h.

    `run` submits a coroutine to the swarm's event loop and waits for its result.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, prompts: torch.Tensor | None, blocks: RemoteBlocks,
                run: Callable[[Any], Any], key_mask: torch.Tensor | None, start: int, end: int) -> torch.Tensor:
        keep = any(ctx.needs_input_grad[:2])          # a backward will follow: servers keep their forwards
        out, trace = run(blocks.forward(h.detach(), key_mask=key_mask,
                                        prompts=None if prompts is None else prompts.detach(), start=start, end=end,
                                        keep=keep))
        ctx.blocks, ctx.run, ctx.trace, ctx.key_mask, ctx.start = blocks, run, trace, key_mask, start
        ctx.prompts = None if prompts is None else prompts.detach()
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_prompts = ctx.run(ctx.blocks.backward(ctx.trace, grad_out.contiguous(), key_mask=ctx.key_mask,
                                                           prompts=ctx.prompts, start=ctx.start))
        return grad_h, grad_prompts, None, None, None, None, None

