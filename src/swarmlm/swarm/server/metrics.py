"""What a block server counts, for Prometheus (`--metrics-port`): requests, tokens, sessions, bytes,
failures and refusals, in prometheus_client's process-wide registry.

The host wraps each handler in `counted(name, handler)` and counts tokens and sessions where
they happen; exposing the registry over HTTP is the command's business (cli.py starts it), so
nothing here opens a socket. Counters are process-wide: servers in one process add up.
"""

from __future__ import annotations

from typing import Awaitable, Callable

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

Handler = Callable[[str, bytes], Awaitable[bytes]]


def counted(name: str, handler: Handler) -> Handler:
    """`handler` (peer ID, request bytes -> reply bytes), counting its requests, bytes and errors."""
    async def handle(peer_id: str, request: bytes) -> bytes:
        REQUESTS.labels(name).inc()
        BYTES_IN.labels(name).inc(len(request))
        try:
            reply = await handler(peer_id, request)
        except CapacityError:
            REFUSALS.labels(name).inc()
            raise
        except Exception:
            FAILURES.labels(name).inc()
            raise
        BYTES_OUT.labels(name).inc(len(reply))
        return reply
    return handle


def count_step(tokens: int) -> None:
    STEPS.inc()
    TOKENS.inc(tokens)


def sessions_now(n: int, *, opened: bool = False) -> None:
    if opened:
        SESSIONS_OPENED.inc()
    SESSIONS_OPEN.set(n)
