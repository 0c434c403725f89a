"""web.py: an app served on loopback until stopped, and a port in use as a one-line error."""

import asyncio
import socket
import urllib.request

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from swarmlm.errors import UserError
from swarmlm.web import bind, serve_app


def test_an_app_is_served_until_stop_and_its_url_is_given_once_listening():
    async def hello(request):
        return PlainTextResponse("hi")

    async def main():
        stop, ready, urls = asyncio.Event(), asyncio.Event(), []

        def on_ready(url):
            urls.append(url)
            ready.set()

        serving = asyncio.ensure_future(serve_app(Starlette(routes=[Route("/", hello)]), "127.0.0.1", 0, stop=stop,
                                                  on_ready=on_ready))
        await asyncio.wait_for(ready.wait(), 30)
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(urls[0] + "/", timeout=10).read())
        stop.set()
        await asyncio.wait_for(serving, 10)
        return urls, body

    urls, body = asyncio.run(main())
    assert body == b"hi" and len(urls) == 1 and urls[0].startswith("http://127.0.0.1:")
    port = int(urls[0].rsplit(":", 1)[1])
    bind("127.0.0.1", port).close()                      # the port is free again once stopped


def test_a_port_in_use_is_a_one_line_error():
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        with pytest.raises(UserError, match=r"cannot listen on 127\.0\.0\.1:\d+: "):
            bind("127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()
