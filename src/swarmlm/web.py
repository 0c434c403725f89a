"""Serving a web app on uvicorn from inside an asyncio program: the one place that does it, for
the OpenAI-compatible API (api/), the dashboard (dashboard/) and the ledger's dev chain
(ledger/node.py).

    await serve_app(app, "127.0.0.1", 0, stop=stop, on_ready=lambda url: print(url + "/v1"))

The listening socket is bound here, before uvicorn starts, so a port in use is a one-line
`UserError`, and it is made as an IPPROTO_TCP socket: asyncio sets TCP_NODELAY only on sockets
that say so, and without it each keep-alive response waits ~40 ms for the client's delayed ACK.
Imports nothing from swarmlm but errors.py (a leaf module).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any, Callable

from swarmlm.errors import UserError


def url_host(host: str) -> str:
    """`host` as it stands in a URL (an IPv6 literal in brackets)."""
    return f"[{host}]" if ":" in host else host


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (0: a free one), not yet listening; `UserError` if it cannot be."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {url_host(host)}:{port}: {e.strerror or e}") from None
    return sock


async def serve_app(app: Any, host: str, port: int, *, stop: asyncio.Event,
                    on_ready: Callable[[str], None] = lambda url: None, graceful_s: float = 2.0) -> None:
    """Run the ASGI `app` on host:port (0: a free one) until `stop` is set; `on_ready("http://host:port")`
    once it accepts connections. Requests still running get `graceful_s` seconds to finish."""
    import uvicorn

    sock = bind(host, port)
    url = f"http://{url_host(host)}:{sock.getsockname()[1]}"

    class _Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.started:
                on_ready(url)

    server = _Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=graceful_s))
    server.capture_signals = contextlib.nullcontext     # the caller owns signals (it sets `stop`)
    serving = asyncio.ensure_future(server.serve(sockets=[sock]))
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        server.should_exit = True
        stopping.cancel()
        await serving
        sock.close()
