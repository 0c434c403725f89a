"""The event loop a peer's process runs on: uvloop where it is installed, else asyncio's own.

A decoding step crosses three processes, each woken by a socket: asyncio's pure-Python loop
spends ~30-80 us of a cold CPU on each wake-up (selector, handles, transport callbacks), uvloop
(libuv, in C) a fraction of that (bench/swarm_inference.py). hivemind depends on uvloop and
runs its DHT on it, so it is there wherever a peer can run.

    loop = new_event_loop()          # e.g. a client's loop thread (swarm/client/model.py)
    run(main())                      # a server's process (swarm/server/serve.py)

Knows nothing of what runs on the loop.
"""

from __future__ import annotations

import asyncio
from typing import Any, Coroutine

try:
    import uvloop
except ImportError:                  # a platform without it: asyncio's loop serves, only slower
    uvloop = None


def new_event_loop() -> asyncio.AbstractEventLoop:
    return uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()


def run(main: Coroutine[Any, Any, Any]) -> Any:
    """`asyncio.run(main)` on a loop of `new_event_loop`."""
    return uvloop.run(main) if uvloop is not None else asyncio.run(main)
