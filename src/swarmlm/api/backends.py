"""Where the tokens come from: a local model, or the swarm through a `RemoteModel`.

A backend's `tokens(prompt_ids, ...)` is an async iterator on the web server's event loop that
yields generated ids one by one (the last may be eos). Generation never runs on that loop: a
local model decodes on a thread of its own per request, the swarm client on its own event loop.
Closing the iterator (or cancelling the task that reads it) stops generation at once; through
the swarm that closes the session, freeing the servers' caches. Knows nothing of HTTP or text.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, AsyncIterator, Callable, Iterator, Sequence

_ENDED = object()


def _put(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, item: Any) -> None:
    try:
        loop.call_soon_threadsafe(queue.put_nowait, item)
    except RuntimeError:          # the web server's loop is gone: nobody is listening any more
        pass


async def _drain(queue: asyncio.Queue) -> AsyncIterator[Any]:
    while True:
        ok, item = await queue.get()
        if ok:
            yield item
        elif item is _ENDED:
            return
        else:
            raise item


async def from_thread(make: Callable[[], Iterator[Any]]) -> AsyncIterator[Any]:
    """The items of a blocking iterator, produced on a thread of its own; closing this stops it
    after the item it is producing."""
    here = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()

    def work() -> None:
        try:
            items = make()
            try:
                for item in items:
                    if stop.is_set():
                        break
                    _put(here, queue, (True, item))
            finally:
                close = getattr(items, "close", None)
                if close is not None:
                    close()
        except Exception as e:     # raised at the reader
            _put(here, queue, (False, e))
        finally:
            _put(here, queue, (False, _ENDED))

    threading.Thread(target=work, name="api-generate", daemon=True).start()
    try:
        async for item in _drain(queue):
            yield item
    finally:
        stop.set()


async def from_loop(items: AsyncIterator[Any], loop: asyncio.AbstractEventLoop) -> AsyncIterator[Any]:
    """The items of an async iterator that runs on another thread's event loop; closing this
    cancels it there at once."""
    here = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    async def pump() -> None:
        try:
            async for item in items:
                _put(here, queue, (True, item))
        except Exception as e:     # raised at the reader; cancellation only ends the pump
            _put(here, queue, (False, e))
        finally:
            _put(here, queue, (False, _ENDED))

    future = asyncio.run_coroutine_threadsafe(pump(), loop)
    try:
        async for item in _drain(queue):
            yield item
    finally:
        future.cancel()            # reaches the other loop now, before any await here


class LocalBackend:
    """A whole model in this process (model/generate.py's stream_generate)."""

    def __init__(self, model: Any):
        self.model = model
        self.context_len = model.cfg.context_len

    def tokens(self, prompt_ids: Sequence[int], *, max_new_tokens: int, temperature: float, top_p: float,
               seed: int, eos_id: int | None) -> AsyncIterator[int]:
        from swarmlm.model.generate import stream_generate

        def steps() -> Iterator[int]:
            for step in stream_generate(self.model, list(prompt_ids), max_new_tokens=max_new_tokens,
                                        temperature=temperature, top_p=top_p, seed=seed, eos_id=eos_id):
                if step[0] is None:
                    return
                yield step[0]

        return from_thread(steps)


class SwarmBackend:
    """Blocks in the swarm (swarm/client/model.py's RemoteModel): one inference session per request.

    `pay_for(n)` (the ledger's, from cli.py): called before a session opens with the tokens per row
    the request may generate, so the ticket signed at the opening pays for this request's
    max_tokens; openings then take turns (a lock held until the first token or the refusal)."""

    def __init__(self, remote: Any, *, pay_for: Callable[[int], None] | None = None):
        self.remote = remote
        self.context_len = remote.cfg.context_len
        self.pay_for = pay_for
        self._opening = asyncio.Lock()

    async def tokens(self, prompt_ids: Sequence[int], *, max_new_tokens: int, temperature: float, top_p: float,
                     seed: int, eos_id: int | None) -> AsyncIterator[int]:
        steps = self.remote.generate_steps([list(prompt_ids)], max_new_tokens=max_new_tokens,
                                           temperature=temperature, top_p=top_p, seed=seed, eos_id=eos_id)
        relayed = from_loop(steps, self.remote.runner.loop)
        try:
            if self.pay_for is not None:
                async with self._opening:
                    self.pay_for(max_new_tokens)
                    first = await anext(relayed, None)
                if first is None or first[0] is None:
                    return
                yield first[0]
            async for step in relayed:
                if step[0] is None:
                    return
                yield step[0]
        finally:
            await relayed.aclose()      # cancels the session's task now, not when this is collected
