"""`swarmlm dashboard --initial-peers MADDR... [--host 127.0.0.1] [--port P] [--ledger ADDRESS --chain-rpc URL]`:
join the swarm as a client, look at it every `--interval` seconds, and serve the page until SIGINT/SIGTERM, printing
its URL as the last line once it accepts connections.

`run_dashboard(...)` is the same as a coroutine, for the demo (demo/dashboard.py) and tests.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any, Callable, Sequence

from swarmlm.errors import UserError
from swarmlm.web import serve_app


async def run_dashboard(*, initial_peers: Sequence[str], host: str = "127.0.0.1", port: int = 0,
                        interval_s: float = 1.0, stop: asyncio.Event,
                        on_ready: Callable[[str], None] = lambda url: None, panels: Sequence[Any] | None = None) -> None:
    """Serve the dashboard until `stop` is set; `on_ready(url)` once it accepts connections."""
    from swarmlm.dashboard.app import build_app
    from swarmlm.dashboard.collect import Collector
    from swarmlm.dashboard.panels import default_panels
    from swarmlm.p2p.peer import Peer

    async with await Peer.create(initial_peers=initial_peers, client_mode=True) as peer:
        collector = Collector(peer, default_panels() if panels is None else panels)
        await collector.refresh()
        looking = asyncio.ensure_future(collector.run_forever(interval_s))
        try:
            await serve(build_app(collector), host, port, stop=stop, on_ready=on_ready)
        finally:
            looking.cancel()
            await asyncio.gather(looking, return_exceptions=True)


async def serve(app: Any, host: str, port: int, *, stop: asyncio.Event,
                on_ready: Callable[[str], None] = lambda url: None) -> None:
    """Run `app` on host:port (web.py; 0: a free port) until `stop` is set; `on_ready(url)` (the page's) once listening."""
    await serve_app(app, host, port, stop=stop, on_ready=lambda url: on_ready(url + "/"))


def check_args(args: Any) -> None:
    if not args.initial_peers:
        raise UserError("--initial-peers MADDR ... is required (the dashboard joins an existing swarm)")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be 0..65535, got {args.port}")
    if not 0.1 <= args.interval <= 3600:
        raise UserError(f"--interval must be 0.1..3600 seconds, got {args.interval}")
    if bool(getattr(args, "ledger", None)) != bool(getattr(args, "chain_rpc", None)):
        raise UserError("--ledger ADDRESS and --chain-rpc URL go together")


def dashboard_from_args(args: Any) -> int:
    check_args(args)
    from swarmlm.p2p.peer import check_maddr
    for maddr in args.initial_peers:
        check_maddr(maddr)

    panels = None
    if getattr(args, "ledger", None):
        from swarmlm.dashboard.ledger_panel import LedgerPanel
        from swarmlm.dashboard.panels import default_panels
        panels = [*default_panels(), LedgerPanel.connect(args.ledger, args.chain_rpc)]

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_dashboard(initial_peers=args.initial_peers, host=args.host, port=args.port,
                            interval_s=args.interval, stop=stop, on_ready=lambda url: print(url, flush=True),
                            panels=panels)

    asyncio.run(main())
    return 0
