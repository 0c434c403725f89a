"""The event loop a peer's process runs on: asyncio's own, or uvloop when asked.

`SWARMLM_EVENT_LOOP=uvloop` puts servers (swarm/server/serve.py) and swarm clients' loop
threads (swarm/client/model.py) on uvloop (hivemind depends on it, so it is installed wherever
a peer runs); unset or `asyncio`, they run on asyncio's loop. uvloop's socket wake-ups cost
less CPU, but on the 2-core machine of bench/swarm_inference.py decoding through two servers
came out no faster with it (swarm/ideal 0.88-0.91 against 0.90-0.91 on asyncio's loop, same
runs), so asyncio's stays the default and uvloop is one variable away for a comparison. The
side channel (channel/conn.py) and its tests run on both.

    loop = new_event_loop()          # a swarm client's loop thread
    run(main())                      # a server's process

Knows nothing of what runs on the loop.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Coroutine

from swarmlm.errors import UserError

try:
    import uvloop
except ImportError:                  # a platform without it: asyncio's loop, whatever is asked
    uvloop = None


def _use_uvloop() -> bool:
    asked = os.environ.get("SWARMLM_EVENT_LOOP", "")
    if asked not in ("", "uvloop", "asyncio"):
        raise UserError(f"SWARMLM_EVENT_LOOP is uvloop or asyncio, not {asked!r}")
    return uvloop is not None and asked == "uvloop"


def new_event_loop() -> asyncio.AbstractEventLoop:
    return uvloop.new_event_loop() if _use_uvloop() else asyncio.new_event_loop()


def run(main: Coroutine[Any, Any, Any]) -> Any:
    """`asyncio.run(main)` on a loop of `new_event_loop`."""
    return uvloop.run(main) if _use_uvloop() else asyncio.run(main)
