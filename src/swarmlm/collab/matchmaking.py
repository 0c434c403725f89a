"""Matchmaking: the peers ready for one step agree on a group with a known member list.

The leader of a step is the smallest peer ID among the round's candidates (progress.py says
who they are). Everybody else calls the leader's `join` handler; the leader gathers joiners
until every candidate it expects has joined or `gather_timeout_s` has passed, then answers
every joiner with the same `Group`: a group ID and the sorted member list. A leader that
itself follows a smaller peer redirects; a leader that is already past the step answers
"ahead" (the joiner fell behind and must download the state); a leader at the same step with
another lineage (the digest of the rounds behind its model, progress.py) answers "diverged":
the swarm split into groups for an earlier step, so the joiner holds another model and must
download the leader's before it averages with it (averaging gradients of two models would keep
them apart for good: the DHT's progress records, which also compare lineages, lag the steps of
a fast run and may never show both at one step); a leader whose group closed
without the joiner answers "closed", and the joiner asks again until the round ends one way
or the other. A leader that does not answer is excluded and the next smallest ID leads.

The member list is decided by one peer, so all members of a group see the same list. Knows
nothing of tensors; `Peer` or `MemoryPeer` carries the calls.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from dataclasses import dataclass, field
from typing import Any

from swarmlm.errors import PeerError, RoundFailed, WireError
from swarmlm.log import get_logger
from swarmlm.p2p import rpc

log = get_logger(__name__)

JOIN_HANDLER = "swarmlm/collab/join/1"
_RETRY_PAUSE_S = 0.05


class FellBehind(RoundFailed):
    """The swarm finished this step without us: download the state from `ahead`."""

    def __init__(self, message: str, ahead: str | None):
        super().__init__(message)
        self.ahead = ahead


@dataclass(frozen=True)
class Group:
    group_id: bytes                 # names this round on the wire
    step: int                       # the step the group averages for
    members: tuple[str, ...]        # sorted peer IDs; member i owns parts i, i + n, i + 2n, ...
    leader: str


@dataclass(frozen=True)
class JoinRequest:
    run_id: str
    step: int
    lineage: str = ""               # the joiner's model's lineage at `step` ("": not checked)


@dataclass(frozen=True)
class JoinReply:
    status: str                     # "ok" | "redirect" | "ahead" | "diverged" | "closed" | "busy"
    step: int                       # the leader's current step
    group_id: bytes = b""
    members: list[str] = field(default_factory=list)
    redirect: str = ""              # with "redirect": the peer that leads instead


@dataclass
class _Gathering:
    expected: set[str]              # candidates the leader waits for (itself excluded)
    joined: set[str] = field(default_factory=set)
    group: asyncio.Future | None = None
    complete: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def closed(self) -> bool:
        return self.group is not None and self.group.done()


def choose_leader(candidates: list[str]) -> str:
    return min(candidates)


def group_id_for(run_id: str, step: int, members: tuple[str, ...], nonce: bytes) -> bytes:
    return hashlib.sha256("\n".join([run_id, str(step), *members]).encode() + nonce).digest()[:16]


class Matchmaker:
    """Forms groups for this peer; serves `join` for peers that choose it as leader."""

    def __init__(self, peer: Any, run_id: str, *, gather_timeout_s: float):
        self.peer = peer
        self.run_id = run_id
        self.gather_timeout_s = gather_timeout_s
        self.step = 0                                   # this peer's current step; set by the optimizer
        self.lineage = ""                               # and its model's lineage at that step
        self._gatherings: dict[int, _Gathering] = {}
        self._following: dict[int, str] = {}
        self._changed = asyncio.Event()                 # replaced by a fresh one at every change

    @classmethod
    async def create(cls, peer: Any, run_id: str, *, gather_timeout_s: float = 5.0) -> Matchmaker:
        mm = cls(peer, run_id, gather_timeout_s=gather_timeout_s)
        await peer.add_handler(JOIN_HANDLER, rpc.message_handler(JoinRequest, mm.rpc_join, max_request_bytes=4096),
                               max_request_bytes=4096)
        return mm

    async def set_step(self, step: int, lineage: str = "") -> None:
        """This peer moved on to `step` with a model of `lineage`: joiners for earlier steps now hear
        "ahead", joiners at this step with another lineage "diverged"."""
        self.step, self.lineage = step, lineage
        for s in [s for s in self._gatherings if s < step]:
            del self._gatherings[s]
        for s in [s for s in self._following if s < step]:
            del self._following[s]
        await self._notify()

    async def abandon(self, step: int) -> None:
        """The round of `step` failed: forget its group, so a retry gathers afresh."""
        self._gatherings.pop(step, None)
        self._following.pop(step, None)
        await self._notify()

    async def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # ---- serving ----------------------------------------------------------------------------------

    async def rpc_join(self, peer_id: str, req: JoinRequest) -> JoinReply:
        if req.run_id != self.run_id:
            raise WireError(f"this peer trains run {self.run_id!r}, not {req.run_id!r}")
        deadline = time.monotonic() + self.gather_timeout_s
        while True:
            if self.step > req.step:
                return JoinReply("ahead", self.step)
            if self.step == req.step and req.lineage and self.lineage and req.lineage != self.lineage:
                return JoinReply("diverged", self.step)
            g = self._gatherings.get(req.step)
            if g is not None:
                if g.closed:
                    members = g.group.result().members
                    if peer_id in members:
                        return self._ok(g.group.result())
                    return JoinReply("closed", self.step)
                g.joined.add(peer_id)
                if g.expected <= g.joined:
                    g.complete.set()
                group = await asyncio.wait_for(asyncio.shield(g.group), self.gather_timeout_s + 1.0)
                return self._ok(group) if peer_id in group.members else JoinReply("closed", self.step)
            if req.step in self._following:
                return JoinReply("redirect", self.step, redirect=self._following[req.step])
            left = deadline - time.monotonic()
            if left <= 0:
                return JoinReply("busy", self.step)
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except asyncio.TimeoutError:
                pass

    @staticmethod
    def _ok(group: Group) -> JoinReply:
        return JoinReply("ok", group.step, group_id=group.group_id, members=list(group.members))

    # ---- asking ------------------------------------------------------------------------------------

    async def form_group(self, step: int, candidates: list[str], *, timeout_s: float
                         ) -> tuple[Group, set[str]]:
        """A group for `step` among `candidates` (this peer included), and the peers found unresponsive.

        Raises `FellBehind` when the swarm already finished `step`, `RoundFailed` after `timeout_s`.
        """
        me = self.peer.peer_id
        deadline = time.monotonic() + timeout_s
        excluded: set[str] = set()
        suspects: set[str] = set()
        try:
            while True:
                live = sorted((set(candidates) - excluded) | {me})
                leader = choose_leader(live)
                if leader == me:
                    self._following.pop(step, None)
                    group, missing = await self._lead(step, set(live) - {me})
                    return group, suspects | missing
                self._following[step] = leader
                await self._notify()
                while leader:
                    if time.monotonic() > deadline:
                        raise RoundFailed(f"no group for step {step} within {timeout_s:.1f} s")
                    try:
                        reply = await rpc.call_message(
                            self.peer, leader, JOIN_HANDLER, JoinRequest(self.run_id, step, self.lineage), JoinReply,
                            timeout_s=self.gather_timeout_s + 2.0, max_response_bytes=1 << 20)
                    except PeerError as e:
                        log.info("leader %s for step %d failed: %s", leader, step, e)
                        excluded.add(leader)
                        suspects.add(leader)
                        break
                    group = self._check_reply(reply, leader, step)
                    if group is not None:
                        return group, suspects
                    if reply.status == "redirect" and reply.redirect and reply.redirect not in excluded:
                        leader = reply.redirect
                        self._following[step] = leader
                        await self._notify()
                    elif reply.status == "busy":
                        excluded.add(leader)
                        break
                    else:                                   # "closed": ask again until it is decided
                        await asyncio.sleep(_RETRY_PAUSE_S)
        finally:
            if self._following.get(step) is not None:
                del self._following[step]

    def _check_reply(self, reply: JoinReply, leader: str, step: int) -> Group | None:
        if reply.status == "ahead":
            raise FellBehind(f"{leader} is at step {reply.step}, past step {step}", leader)
        if reply.status == "diverged":
            raise FellBehind(f"{leader} holds another model at step {step} (another lineage)", leader)
        if reply.status != "ok":
            return None
        members = tuple(reply.members)
        if (list(members) != sorted(set(members)) or self.peer.peer_id not in members or leader not in members
                or len(reply.group_id) != 16):
            raise RoundFailed(f"leader {leader} sent a malformed group for step {step}")
        return Group(reply.group_id, step, members, leader)

    async def _lead(self, step: int, expected: set[str]) -> tuple[Group, set[str]]:
        g = _Gathering(expected=set(expected), group=asyncio.get_running_loop().create_future())
        self._gatherings[step] = g
        await self._notify()
        if g.expected:
            try:
                await asyncio.wait_for(g.complete.wait(), self.gather_timeout_s)
            except asyncio.TimeoutError:
                pass
        members = tuple(sorted(g.joined | {self.peer.peer_id}))
        group = Group(group_id_for(self.run_id, step, members, os.urandom(8)), step, members, self.peer.peer_id)
        g.group.set_result(group)
        missing = g.expected - g.joined
        if missing:
            log.info("step %d: %d expected peers did not join: %s", step, len(missing), sorted(missing))
        return group, missing
