"""Chained steps at a server: inputs pushed in by the previous server, outputs pushed on to the next.

- `Inbox`: one session's pushed inputs by position. A step sent without hidden states waits
  for its own (bounded by `PUSH_WAIT_S`); a `pushed` step delivers one; a `pushed` step with no
  hidden states (the client's) ends the wait with an error, so a chain whose previous server
  died never leaves a step hanging.
- `NextLink`: this server's side-channel connection to the next server of the client's chain
  (p2p/channel/, `PURPOSE_PUSH`, dialed only where that server announced itself; it opens with
  a `PushBind` the next server checks against the pusher the client named there), and the
  pushes in flight on it. A push that fails is logged and dropped: the client still gets this
  server's reply and pushes the outputs itself, or replaces the next server.

Knows nothing of blocks or caches: host.py checks what arrives and runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Callable

import torch

from swarmlm import serialize
from swarmlm.errors import CapacityError, PeerError, WireError
from swarmlm.log import get_logger
from swarmlm.p2p import rpc
from swarmlm.swarm import fast, wire

logger = get_logger(__name__)

PUSH_WAIT_S = 30.0           # how long a step waits for its pushed input
CONNECT_TIMEOUT_S = 2.0      # dialing the next server while opening a session
MAX_WAITING = 4              # positions of one session with a pushed input or a step waiting for one
MAX_LINKS = 16               # re-links one session may ask for (each may dial a peer the client names)
MAX_DIALS_PER_PEER = 64      # next hops one client may have this server dial per DIAL_WINDOW_S (all sessions)
DIAL_WINDOW_S = 60.0
MAX_PEER_ID_CHARS = 128
MAX_ENDPOINT_BYTES = 4096
_CLOSED = object()           # what a waiting step finds when its session is dropped
_LATE = object()             # ... when no input came in time


class Inbox:
    def __init__(self) -> None:
        self._slots: dict[int, asyncio.Future] = {}
        self._fast: Callable[[int, Any], None] | None = None   # server/fast.py's standing wait (arm)

    def arm(self, position: int, run: Callable[[int, Any], None]) -> None:
        """A fast WAIT (server/fast.py): from the step at `position` on, `run(position, input)` each input
        the moment it is delivered (at once for one delivered already), until `disarm`. The input is a
        tensor, or None (called off)."""
        slot = self._slots.get(position)
        if slot is not None and not slot.done():
            raise WireError(f"a step already waits for the input at position {position}")
        self._fast = run
        if slot is not None:
            del self._slots[position]
            run(position, slot.result())

    @property
    def armed(self) -> bool:
        """Whether an input delivered now runs its step at once (a fast wait stands)."""
        return self._fast is not None

    def disarm(self) -> None:
        """End the fast wait: a slow step (which waits for its own input, or brings it) is next."""
        self._fast = None

    def _slot(self, position: int) -> asyncio.Future:
        slot = self._slots.get(position)
        if slot is None:
            if len(self._slots) >= MAX_WAITING:
                raise CapacityError(f"{MAX_WAITING} pushed inputs are already waiting in this session")
            slot = self._slots[position] = asyncio.get_running_loop().create_future()
        return slot

    def deliver(self, position: int, hidden: torch.Tensor | None) -> None:
        """The input of the step at `position` (None: call that step off)."""
        if self._fast is not None:
            self._fast(position, hidden)
            return
        slot = self._slot(position)
        if slot.done():
            raise WireError(f"the step at position {position} already has its input")
        slot.set_result(hidden)

    async def wait(self, position: int, timeout_s: float | None = None) -> torch.Tensor:
        """The pushed input of the step at `position`; `WireError` if called off or late."""
        timeout_s = PUSH_WAIT_S if timeout_s is None else timeout_s
        slot = self._slot(position)
        # a timer that fills the slot, not a timeout context around the wait: leaving one costs ~20 us
        # on the caches a push arrives to, between the push and the step's compute
        late = asyncio.get_running_loop().call_later(timeout_s, _fill, slot, _LATE)
        try:
            hidden = await slot
        finally:
            late.cancel()
            self._slots.pop(position, None)
        if hidden is _LATE:
            raise WireError(f"no input was pushed for position {position} within {timeout_s:.0f} s")
        if hidden is None:
            raise WireError(f"the step at position {position} was called off")
        if hidden is _CLOSED:
            raise WireError("the session was closed")
        return hidden

    def waiting(self, position: int) -> bool:
        """Whether a step at `position` is waiting for its input (tests; logs)."""
        slot = self._slots.get(position)
        return slot is not None and not slot.done()

    def forget_delivered(self) -> None:
        """Drop inputs nobody waits for (a step that came with its own hidden states replaces them)."""
        for position in [p for p, slot in self._slots.items() if slot.done()]:
            del self._slots[position]

    def close(self) -> None:
        """Wake every waiting step with an error (a dropped session)."""
        self._fast = None
        for slot in self._slots.values():
            if not slot.done():
                slot.set_result(_CLOSED)
        self._slots.clear()


def _fill(slot: asyncio.Future, value: object) -> None:
    if not slot.done():
        slot.set_result(value)


def check_next_hop(hop: wire.NextHop) -> wire.NextHop:
    """`WireError` unless `hop` is well formed (it comes from a client)."""
    check_peer_id(hop.peer_id, "next hop")
    if hop.endpoint is not None and not 0 < len(hop.endpoint) <= MAX_ENDPOINT_BYTES:
        raise WireError("next hop: bad endpoint record")
    if len(hop.session_id) != wire.SESSION_ID_BYTES:
        raise WireError(f"next hop: a session id has {wire.SESSION_ID_BYTES} bytes")
    if not 0 <= hop.start < hop.end:
        raise WireError(f"next hop: bad span {hop.start}:{hop.end}")
    return hop


def check_peer_id(peer_id: str, what: str) -> str:
    if not 0 < len(peer_id) <= MAX_PEER_ID_CHARS or not peer_id.isalnum():
        raise WireError(f"{what}: {peer_id[:MAX_PEER_ID_CHARS]!r} is not a peer ID")
    return peer_id


class NextLink:
    """Build with `await NextLink.connect(side, hop, owner=...)` (`PeerError` if unreachable).

    After the `PushBind` (a request and its reply), pushes are one-way frames: nobody waits for an
    acknowledgement (the client learns of a lost input from the next server's step), so a push
    costs one record, not a round trip. The next server closes the connection on a push it
    refuses; every later push then reports it could not leave, and the client relays."""

    def __init__(self, hop: wire.NextHop, conn: Any):
        self.hop = hop
        self.conn = conn

    @classmethod
    async def connect(cls, side: Any, hop: wire.NextHop, *, owner: str, max_response_bytes: int) -> NextLink:
        """Dial `hop`'s server for pushes into `owner`'s session there. `PeerError` if it cannot be
        reached; `EndpointRefused` (nothing dialed) if its endpoint record is not its own."""
        conn = await side.open(hop.peer_id, wire.PURPOSE_PUSH, timeout_s=CONNECT_TIMEOUT_S,
                               max_record_bytes=rpc.frame_bytes(max_response_bytes), endpoint=hop.endpoint)
        channel = rpc.Channel(conn, conn, peer_id=hop.peer_id, name=wire.PURPOSE_PUSH)
        try:
            await channel.call_message(wire.PushBind(owner=owner, session_id=hop.session_id), wire.PushBound,
                                       timeout_s=CONNECT_TIMEOUT_S, max_response_bytes=max_response_bytes)
        except BaseException:
            channel.close()
            raise
        return cls(hop, conn)

    @property
    def broken(self) -> bool:
        return self.conn.is_closing() or self.conn.closed.is_set()

    def push(self, position: int, hidden: torch.Tensor) -> bool:
        """Push `hidden` as the input of the next server's step at `position` (written before this
        returns); False if the link is broken (the next server refused a push, or is gone)."""
        if self.broken:
            return False
        req = wire.StepRequest(session_id=self.hop.session_id, start=self.hop.start, end=self.hop.end,
                               position=position, hidden=hidden, pushed=True)
        try:
            self.conn.write(rpc.frame(rpc.REQUEST, serialize.encode_message(req)))
        except ConnectionError as e:
            logger.info("push to %s lost: %s", self.hop.peer_id, e)
            return False
        return True

    def push_fast(self, position: int, raw: memoryview) -> bool:
        """`push` as a fast-lane record (swarm/fast.py) of the outputs' raw bytes (`fast.tensor_bytes`):
        the next server runs its waiting step at once."""
        if self.broken:
            return False
        try:
            self.conn.write(fast.record(fast.PUSH, self.hop.session_id, position, raw))
        except ConnectionError as e:
            logger.info("push to %s lost: %s", self.hop.peer_id, e)
            return False
        return True

    def close(self) -> None:
        if not self.broken:
            with contextlib.suppress(ConnectionError):
                self.conn.write(rpc.frame(rpc.END))
        self.conn.close()
