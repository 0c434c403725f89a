"""A host's push connections: where the previous server of a client's chain pushes its outputs in.

chain.py's `NextLink` dials them (`PURPOSE_PUSH`). A connection opens with a `PushBind` naming a
session whose client named this very dialer as its pusher (answered with `PushBound`); from then
on it carries one-way pushed steps into that session only: wire.py's `StepRequest`s (`pushed`),
read here, and the fast lane's PUSH records, taken as they arrive (server/fast.py). A push
refused ends the connection (with an ERROR frame), so the pusher stops pushing and the client
relays. Knows nothing of blocks or caches: the host's `_deliver` checks an input and hands it on.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from swarmlm import serialize
from swarmlm.errors import PeerError, WireError
from swarmlm.log import get_logger
from swarmlm.p2p import rpc
from swarmlm.swarm import wire

if TYPE_CHECKING:
    from swarmlm.swarm.server.host import BlockHost

logger = get_logger(__name__)

BIND_BYTES = 1024            # the largest PushBind read


async def serve_pushes(host: BlockHost, conn: Any) -> None:
    """One previous server's push connection into `host`'s sessions (the module docstring)."""
    limit = host.max_request_bytes()
    idle_s = host.budget.limits.idle_timeout_s
    pusher = conn.peer_id
    try:
        tag, request = await rpc.within(rpc.read_frame(conn, max_bytes=BIND_BYTES), idle_s)
        if tag != rpc.REQUEST:
            return
        try:
            bind = serialize.decode_message(request, wire.PushBind, max_bytes=BIND_BYTES)
            key = (bind.owner, bind.session_id)
            session = host.sessions.get(key)
            if session is None or session.pusher != pusher:
                raise WireError("no session here takes pushes from you")
        except WireError as e:
            conn.write(rpc.frame(rpc.ERROR, str(e).encode()[:rpc.MAX_ERROR_BYTES]))
            return
        conn.write(rpc.frame(rpc.DATA, serialize.encode_message(wire.PushBound())))
        conn.set_record_handler(host.fast.on_push(conn, key))     # fast pushes, as they arrive
        while True:
            tag, request = await rpc.within(rpc.read_frame(conn, max_bytes=limit), idle_s)
            if tag == rpc.END:
                return
            try:
                await _push_into(host, key, pusher, tag, request, limit)
            except WireError as e:
                logger.info("a push from %s refused: %s", pusher, e)
                conn.write(rpc.frame(rpc.ERROR, str(e).encode()[:rpc.MAX_ERROR_BYTES]))
                return
    except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, PeerError) as e:
        logger.debug("push connection from %s ended: %s", pusher, e)


def bound_session(host: BlockHost, key: tuple[str, bytes], pusher: str, session_id: bytes, pushed: bool) -> Any:
    """The session `key` a push connection is bound to, for a push (`pushed`) naming `session_id` from
    `pusher`; `WireError` if it is not a push, names another session, or `pusher` may no longer push there."""
    session = host.sessions.get(key)
    if session_id != key[1] or not pushed or session is None or session.pusher != pusher:
        raise WireError("a push for another session, or not a push, or no longer allowed")
    return session


async def _push_into(host: BlockHost, key: tuple[str, bytes], pusher: str, tag: int, request: bytes,
                     limit: int) -> None:
    """One pushed step into the bound session `key`; `WireError` if it is not one, or not allowed."""
    if tag != rpc.REQUEST:
        raise WireError(f"expected a request frame, got tag {tag}")
    req = serialize.decode_message(request, wire.StepRequest, max_bytes=limit)
    session = bound_session(host, key, pusher, req.session_id, req.pushed)
    if (req.start, req.end) != (session.start, session.end):
        raise WireError(f"session runs blocks {session.start}:{session.end}, push for {req.start}:{req.end}")
    await host._deliver(session, req)
