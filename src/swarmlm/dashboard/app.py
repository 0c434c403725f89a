"""The dashboard's web app (Starlette): the page, its assets, the JSON API and the live stream.

    GET /             the page (static/index.html)
    GET /static/NAME  one of the shipped assets, by exact name (nothing else on disk is reachable)
    GET /api/swarm    the latest snapshot as JSON (see collect.py)
    GET /api/events   server-sent events: one `data: <snapshot JSON>` per refresh, the current one first

Nothing is fetched from elsewhere: the page's HTML, CSS and JS are files of this package.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

ASSETS = {"index.html": "text/html; charset=utf-8", "dash.css": "text/css; charset=utf-8",
          "dash.js": "text/javascript; charset=utf-8"}


def asset(name: str) -> bytes:
    return resources.files("swarmlm.dashboard").joinpath("static", name).read_bytes()


def build_app(collector: Any) -> Starlette:
    files = {name: asset(name) for name in ASSETS}     # read once: they ship with the package

    async def index(request: Request) -> Response:
        return Response(files["index.html"], media_type=ASSETS["index.html"], headers={"cache-control": "no-cache"})

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in files:
            return PlainTextResponse("not found", status_code=404)
        return Response(files[name], media_type=ASSETS[name], headers={"cache-control": "no-cache"})

    async def swarm(request: Request) -> Response:
        return JSONResponse(collector.snapshot)

    async def events(request: Request) -> Response:
        return StreamingResponse(_events(collector), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    return Starlette(routes=[Route("/", index), Route("/static/{name}", static), Route("/api/swarm", swarm),
                             Route("/api/events", events)])


async def _events(collector: Any) -> AsyncIterator[bytes]:
    async for snap in collector.updates():
        yield b"data: " + json.dumps(snap, allow_nan=False, default=_plain).encode() + b"\n\n"


def _plain(obj: Any) -> Any:
    raise TypeError(f"{type(obj).__name__} is not plain data")
