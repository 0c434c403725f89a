"""The event loop a peer's process runs on: uvloop where it is installed, else asyncio's own.

A decoding step crosses three processes, each woken by a socket: asyncio's pure-Python loop
spends tens of microseconds of a cold CPU on each wake-up (selector, handles, transport
callbacks), uvloop (libuv, in C) a fraction of that (bench/swarm_inference.py). hivemind depends
on uvloop and runs its DHT on it, so it is there wherever a peer can run.
`SWARMLM_EVENT_LOOP=asyncio` (or `uvloop`) chooses for every process that asks here.

    loop = new_event_loop()          # a swarm client's loop thread (swarm/client/model.py)
    run(main())                      # a server's process (swarm/server/serve.py)

Knows nothing of what runs on the loop.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Coroutine

from swarmlm.errors import UserError

try:
    import uvloop
except ImportError:                  # a platform without it: asyncio's loop serves, only slower
    uvloop = None


def _use_uvloop() -> bool:
    asked = os.environ.get("SWARMLM_EVENT_LOOP", "")
    if asked not in ("", "uvloop", "asyncio"):
        raise UserError(f"SWARMLM_EVENT_LOOP is uvloop or asyncio, not {asked!r}")
    return uvloop is not None and asked != "asyncio"


def new_event_loop() -> asyncio.AbstractEventLoop:
    return uvloop.new_event_loop() if _use_uvloop() else asyncio.new_event_loop()


def run(main: Coroutine[Any, Any, Any]) -> Any:
    """`asyncio.run(main)` on a loop of `new_event_loop`."""
    return uvloop.run(main) if _use_uvloop() else asyncio.run(main)
