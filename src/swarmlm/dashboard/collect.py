"""The `Collector`: runs every panel through one `Peer`, keeps the latest snapshot, wakes the streams.

    collector = Collector(peer, default_panels())
    await collector.refresh()            # one look at the swarm
    collector.snapshot                   # {"time": ..., "version": n, "panels": [...], "models": ..., ...}
    async for snap in collector.updates(): ...   # the current snapshot, then each new one

A panel that fails (any exception) keeps its previous data and reports its error under
"errors", so one bad read, or one panel's bug, never blanks the page or stops the looking. `run_forever(interval_s)` refreshes until cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator, Callable, Sequence

from swarmlm.errors import SwarmlmError
from swarmlm.log import get_logger

logger = get_logger(__name__)

SCHEMA = 1      # the snapshot's layout; bumped when a key changes meaning (keys are only ever added)


class Collector:
    def __init__(self, peer: Any, panels: Sequence[Any], *, clock: Callable[[], float] = time.time):
        self.peer = peer
        self.panels = list(panels)
        self.clock = clock
        self.version = 0
        self.data: dict[str, Any] = {}
        self.errors: dict[str, str] = {}
        self.snapshot: dict[str, Any] = self._snapshot(self.clock())
        self._changed = asyncio.Condition()

    async def refresh(self) -> dict[str, Any]:
        now = self.clock()
        results = await asyncio.gather(*(p.collect(self.peer, now) for p in self.panels), return_exceptions=True)
        for panel, result in zip(self.panels, results):
            if isinstance(result, Exception):      # one panel's failure (a DHT read, a bug) is shown, not fatal
                level = logging.WARNING if isinstance(result, (SwarmlmError, OSError, asyncio.TimeoutError)) \
                    else logging.ERROR
                logger.log(level, "panel %s: %s", panel.name, result, exc_info=level == logging.ERROR)
                self.errors[panel.name] = str(result) or type(result).__name__
            elif isinstance(result, BaseException):
                raise result                       # cancellation
            else:
                self.errors.pop(panel.name, None)
                self.data.update(result)
        self.version += 1
        self.snapshot = self._snapshot(now)
        async with self._changed:
            self._changed.notify_all()
        return self.snapshot

    def _snapshot(self, now: float) -> dict[str, Any]:
        return {"schema": SCHEMA, "time": now, "version": self.version, "peer_id": self.peer.peer_id,
                "panels": [p.name for p in self.panels], "errors": dict(self.errors), **self.data}

    async def run_forever(self, interval_s: float) -> None:
        while True:
            started = self.clock()
            await self.refresh()
            await asyncio.sleep(max(0.0, interval_s - (self.clock() - started)))

    async def updates(self) -> AsyncIterator[dict[str, Any]]:
        """The current snapshot, then every new one (a slow reader skips to the newest)."""
        seen = -1
        while True:
            if self.version == seen:
                async with self._changed:
                    await self._changed.wait_for(lambda: self.version != seen)
            seen = self.version
            yield self.snapshot
