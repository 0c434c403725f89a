"""`--metrics-port P`: the process's Prometheus registry over HTTP at 127.0.0.1:P/metrics.

Each service counts in its own metrics module (swarm/server/metrics.py, collab/metrics.py,
store/metrics.py; a later service adds its own) into prometheus_client's process-wide
registry; cli.py calls `expose` for any verb given `--metrics-port`, before the verb runs.
The server is prometheus_client's, on a daemon thread, so it needs no event loop.
"""

from __future__ import annotations

import sys

from swarmlm.errors import UserError


def expose(port: int, host: str = "127.0.0.1", *, out=sys.stderr) -> int:
    """Serve /metrics on host:port (0 picks a free one) from now on; prints and returns the port."""
    from prometheus_client import start_http_server

    if not 0 <= port <= 65535:
        raise UserError(f"--metrics-port must be 0..65535, got {port}")
    try:
        server, _ = start_http_server(port, addr=host)
    except OSError as e:
        raise UserError(f"--metrics-port {port}: cannot listen on {host}:{port} ({e.strerror or e})") from None
    bound = server.server_address[1]
    print(f"metrics: http://{host}:{bound}/metrics", file=out, flush=True)
    return bound
