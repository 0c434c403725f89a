"""Messages between swarm clients and block servers, imported by both sides.

Each RPC has a request and a reply dataclass; they travel through
`serialize.encode_message`/`decode_message` (msgpack with checked tensors, never pickle).
Handler names are the `RPC_*` constants. A span is the half-open block range
`[start, end)` in absolute block indices.

Inference sessions (stateful, per-server KV cache):
    open  -> OpenRequest / OpenReply      reserve a cache for (batch, max_length) on a span
    step  -> StepRequest / StepReply      run only the new positions; `position` is how many
                                          positions the client believes the server's cache holds
    close -> CloseRequest / CloseReply    free it (idle sessions also time out)
Steps travel on a channel (`RPC_STEPS`, p2p/rpc.py): one long-lived stream per session and
server carrying StepRequest frames, each answered by a StepReply or an error frame; a round
trip on an open stream costs a fraction of a unary call's. `RPC_STEP` (unary) stays for
clients or servers without it. A server with a side channel (p2p/channel/) offers the same
channel over it (`PURPOSE_STEPS`): its OpenReply carries its signed endpoint record, and a
step then skips both p2pd daemons, encrypted.
Chained steps: a client may open its chain from the last server backwards, giving each server
the next one's `NextHop` (a peer ID, never an address: the server dials only what that peer
announced under its own signature) and telling each server which peer will push into it
(`pusher`); a step then goes to every server at once, the first with its hidden states
(`push=True`), the others with none: each server pushes its outputs straight to the next (on its
own side-channel connection, `PURPOSE_PUSH`, which opens with a `PushBind` naming the session)
and replies to the client too, so the client keeps every hop's inputs for failover, but waits
for no hop in between. A step waiting for a push that never comes is ended by the client (a
`pushed` step with no hidden).
    link  -> LinkRequest / LinkReply      after a failover, re-chain the servers next to the
                                          replacement: the one after it takes pushes from a new
                                          `pusher`, the one before it pushes to it (`next_hop`)
Stateless, for training and evaluation:
    forward  -> SpanForwardRequest / SpanForwardReply
    backward -> SpanBackwardRequest / SpanBackwardReply  (gradients w.r.t. the inputs and deep prompts)
A forward may ask to be kept (`keep_id`) so that its backward differentiates the kept graph
instead of recomputing it; the backward still carries its inputs, so a server that evicted it
recomputes and the result is the same.
Plus `info` (InfoRequest / InfoReply): the server's span, state and load; clients time it as
their round-trip measurement. What servers announce in the DHT is in swarm/dht.py.

Shapes: hidden (B, T, D); key_mask (B, T) bool, True = a real token (rows are left padded);
prompts (n_span_blocks, B or 1, P, D), added to the first P positions before each block.
Knows nothing of peers, routing or models beyond these shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from swarmlm.compact import compact

RPC_OPEN = "swarm/open"
RPC_STEP = "swarm/step"
RPC_CLOSE = "swarm/close"
RPC_FORWARD = "swarm/forward"
RPC_BACKWARD = "swarm/backward"
RPC_INFO = "swarm/info"
RPC_LINK = "swarm/link"
RPC_NAMES = (RPC_OPEN, RPC_STEP, RPC_CLOSE, RPC_FORWARD, RPC_BACKWARD, RPC_INFO, RPC_LINK)
RPC_STEPS = "swarm/steps"        # a channel (raw stream) of StepRequest -> StepReply frames
PURPOSE_STEPS = "swarm/steps"    # the same channel over the side channel
PURPOSE_PUSH = "swarm/push"      # a server's pushes into the next server: PushBind, then pushed StepRequests

MAX_TICKET_BYTES = 1024          # an OpenRequest's ticket
ACCESS_REFUSED = "access refused"  # a server's admission refusals contain this; clients stop there, no failover
SESSION_ID_BYTES = 16            # a random id the client picks; the server scopes it by the caller's peer ID
KEEP_ID_BYTES = 16               # the same for a forward kept for its backward


# ---- inference sessions --------------------------------------------------------------------

@dataclass(frozen=True)
class OpenRequest:
    session_id: bytes            # SESSION_ID_BYTES random bytes chosen by the client
    start: int                   # first block of the span to run in this session
    end: int                     # one past the last block
    batch: int                   # B: rows of every step of this session
    max_length: int              # positions the cache must hold (prompt + new tokens)
    pusher: str | None = None         # the peer (the previous server) allowed to push inputs into this session
    next_hop: NextHop | None = None   # where this server pushes its outputs when a step asks it to
    ticket: bytes | None = None       # opaque admission ticket for the server's `admit` hook (the ledger's
                                      # signed receipt); at most MAX_TICKET_BYTES


@dataclass(frozen=True)
class NextHop:
    """The next server of the client's chain, as the server before it needs to know it."""
    peer_id: str                 # the next server: dialed only where it announced itself
    session_id: bytes            # its session of this client
    start: int                   # its span
    end: int
    endpoint: bytes | None = None     # its signed endpoint record (OpenReply.endpoint), saving a DHT look-up


@dataclass(frozen=True)
class OpenReply:
    session_id: bytes
    dtype: str                   # the dtype the server computes in; steps must send hidden states in it
    endpoint: bytes | None = None     # the server's signed side-channel endpoint record (p2p/channel/);
                                      # None: it has none, use the RPC_STEPS libp2p channel
    pushes: bool = False              # it reached next_hop, and will push outputs there when asked


@dataclass(frozen=True)
class PushBind:
    """The first request on a `PURPOSE_PUSH` connection: whose session the pushes are for."""
    owner: str                   # the client that opened the session (and named the pusher)
    session_id: bytes


@dataclass(frozen=True)
class PushBound:
    pass


@compact
@dataclass(frozen=True)
class StepRequest:
    session_id: bytes
    start: int                   # must equal the span the session was opened on
    end: int
    position: int                # cache length the client expects; the server trims a longer cache to it
    hidden: torch.Tensor | None  # (B, T, D) the new positions only; None: they arrive by a push (below)
    key_mask: torch.Tensor | None = None   # (B, T) bool; None = every new position is a real token
    prompts: torch.Tensor | None = None    # (end-start, B or 1, P, D) deep prompts; only at position 0
    chunks: list[int] | None = None        # run the T positions in pieces of these sizes, in order, as the
                                           # original steps did, so a replay reproduces them bit for bit
    push: bool = False                     # also push the outputs to this session's next hop (as a `pushed`
                                           # step there), before replying
    pushed: bool = False                   # only deliver `hidden` as the input of the step at `position` that
                                           # waits for it (hidden None: make that step fail); nothing runs


@compact
@dataclass(frozen=True)
class StepReply:
    hidden: torch.Tensor         # (B, T, D) outputs of the span's last block for the new positions
                                 # (empty for a `pushed` step)
    pushed: bool = False         # the outputs went to the next hop too


@dataclass(frozen=True)
class LinkRequest:
    session_id: bytes
    pusher: str | None = None         # as OpenRequest.pusher: a new previous server will push in
    next_hop: NextHop | None = None   # push outputs here from now on (the old next hop is dropped)


@dataclass(frozen=True)
class LinkReply:
    pushes: bool = False              # the server reaches its next hop (the new one, or the one it had)


@dataclass(frozen=True)
class CloseRequest:
    session_id: bytes


@dataclass(frozen=True)
class CloseReply:
    closed: bool                 # False if the server no longer knew the session


# ---- stateless forward / backward ----------------------------------------------------------

@dataclass(frozen=True)
class SpanForwardRequest:
    start: int
    end: int
    hidden: torch.Tensor                   # (B, T, D) whole sequences
    key_mask: torch.Tensor | None = None   # (B, T) bool
    prompts: torch.Tensor | None = None    # (end-start, B or 1, P, D)
    keep_id: bytes | None = None           # KEEP_ID_BYTES chosen by the client: keep this forward's autograd
                                           # state for the backward that names the same id (if memory allows)


@dataclass(frozen=True)
class SpanForwardReply:
    hidden: torch.Tensor                   # (B, T, D)


@dataclass(frozen=True)
class SpanBackwardRequest:
    start: int
    end: int
    hidden: torch.Tensor                   # (B, T, D) the inputs of the forward being differentiated
    grad_output: torch.Tensor              # (B, T, D) dLoss/d(outputs of the span)
    key_mask: torch.Tensor | None = None   # (B, T) bool
    prompts: torch.Tensor | None = None    # (end-start, B or 1, P, D)
    keep_id: bytes | None = None           # the forward's keep_id: differentiate its kept state if the server
                                           # still holds it for these very inputs, else recompute the forward


@dataclass(frozen=True)
class SpanBackwardReply:
    grad_hidden: torch.Tensor              # (B, T, D) dLoss/d(inputs)
    grad_prompts: torch.Tensor | None = None  # same shape as the request's prompts


# ---- info ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class InfoRequest:
    pass


@dataclass(frozen=True)
class InfoReply:
    model: str                   # the model id the server announces under
    start: int
    end: int
    state: str                   # "joining", "online" or "offline" (dht.STATES)
    dtype: str                   # compute dtype, e.g. "float32"
    block_tokens_per_s: float    # measured decode throughput of one block
    free_cache_tokens: int       # cache positions (summed over rows) still available
    sessions: int                # open inference sessions
    quantization: str = "none"   # weight quantization of the span (dht.ServerRecord.quantization)

