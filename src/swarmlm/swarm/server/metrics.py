"""What a block server counts, for Prometheus (`--metrics-port`): requests, tokens, sessions, bytes,
failures and refusals, in prometheus_client's process-wide registry.

The host wraps each handler in `counted(name, handler)` and counts tokens and sessions where
they happen; exposing the registry over HTTP is the command's business (cli.py starts it), so
nothing here opens a socket. Counters are process-wide: servers in one process add up.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

from prometheus_client import Counter, Gauge

from swarmlm.errors import CapacityError

REQUESTS = Counter("swarmlm_server_requests", "RPC requests answered by this process's block servers", ["rpc"])
FAILURES = Counter("swarmlm_server_failures", "requests answered with an error (bad input, a failed step)", ["rpc"])
REFUSALS = Counter("swarmlm_server_refusals", "requests refused for lack of capacity (sessions, cache)", ["rpc"])
BYTES_IN = Counter("swarmlm_server_received_bytes", "request bytes received", ["rpc"])
BYTES_OUT = Counter("swarmlm_server_sent_bytes", "reply bytes sent", ["rpc"])
TOKENS = Counter("swarmlm_server_tokens", "token positions run through the served blocks by inference steps")
STEPS = Counter("swarmlm_server_steps", "inference steps computed")
SESSIONS_OPENED = Counter("swarmlm_server_sessions_opened", "inference sessions opened")
SESSIONS_OPEN = Gauge("swarmlm_server_sessions_open", "inference sessions open now")

FAST = "swarm/steps (fast lane)"   # the fast lane's label (swarm/fast.py)
Handler = Callable[[str, bytes], Awaitable[bytes]]


def counted(name: str, handler: Handler) -> Handler:
    """`handler` (peer ID, request bytes -> reply bytes), counting its requests, bytes and errors.
    A reply is counted once it has left (`later`): a decoding step's reply or push waits for no counter."""
    requests, failures, refusals = REQUESTS.labels(name), FAILURES.labels(name), REFUSALS.labels(name)
    bytes_in, bytes_out = BYTES_IN.labels(name), BYTES_OUT.labels(name)

    def count(request_bytes: int, reply_bytes: int) -> None:
        requests.inc()
        bytes_in.inc(request_bytes)
        bytes_out.inc(reply_bytes)

    async def handle(peer_id: str, request: bytes) -> bytes:
        try:
            reply = await handler(peer_id, request)
        except CapacityError:
            later(count, len(request), 0)
            refusals.inc()
            raise
        except Exception:
            later(count, len(request), 0)
            failures.inc()
            raise
        later(count, len(request), len(reply))
        return reply
    return handle


def count_step(tokens: int) -> None:
    """One inference step of `tokens` positions (counted once what the step sends has left)."""
    later(_count_step, tokens)


def _count_step(tokens: int) -> None:
    STEPS.inc()
    TOKENS.inc(tokens)


def count_fast_refusal() -> None:
    """A fast-lane record refused (server/fast.py): the client takes the slow path for that step."""
    FAILURES.labels(FAST).inc()


def later(fn: Callable[..., None], *args: Any) -> None:
    """`fn(*args)` once the running task yields (its writes done), or now outside an event loop. A
    prometheus counter costs tens of microseconds on the caches a span's compute has just flushed."""
    try:
        asyncio.get_running_loop().call_soon(fn, *args)
    except RuntimeError:
        fn(*args)


def sessions_now(n: int, *, opened: bool = False) -> None:
    if opened:
        SESSIONS_OPENED.inc()
    SESSIONS_OPEN.set(n)
