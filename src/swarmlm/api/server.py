"""The web app: OpenAI's /v1/models, /v1/completions and /v1/chat/completions over a backend.

`ApiApp(backend, tokenizer, model_name, ...)` builds a Starlette app: it checks the key, reads
a bounded body, parses it (protocol.py), renders chats (chat.py), generates through the
backend (backends.py, never on this event loop), turns ids into text cut at stop strings
(text.py), and answers in OpenAI's JSON, or streams OpenAI's chunks as server-sent events
ending with `data: [DONE]`. A streaming client that disconnects cancels its generation at once
(`EventStream`). `serve(app, host, port, ...)` runs it under uvicorn.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from swarmlm.api import protocol
from swarmlm.api.chat import ChatTemplate
from swarmlm.api.protocol import ApiError, Sampling
from swarmlm.api.text import TextStream
from swarmlm.errors import AccessRefused, NotFoundError, SwarmError, UserError
from swarmlm.log import get_logger
from swarmlm.web import serve_app

logger = get_logger(__name__)

MAX_BODY_BYTES = 1 << 20          # a request body past this is refused with 413
DRAIN_BODY_BYTES = 16 << 20       # how much of an oversized body is read (and dropped) before answering


@dataclass
class Piece:
    text: str                     # new text for the client (maybe "")
    finish_reason: str | None     # "stop" / "length" on the last piece
    n_tokens: int                 # tokens generated so far


class EventStream:
    """An ASGI response that sends server-sent events while it watches for the client going away:
    a disconnect cancels the events' task at once (closing its generation), even mid-step."""

    def __init__(self, events: AsyncIterator[bytes]):
        self.events = events

    async def __call__(self, scope: Any, receive: Callable, send: Callable) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                (b"cache-control", b"no-cache")]})
        streaming = asyncio.ensure_future(self._send_all(send))
        watching = asyncio.ensure_future(self._wait_disconnect(receive))
        await asyncio.wait({streaming, watching}, return_when=asyncio.FIRST_COMPLETED)
        for task in (streaming, watching):
            task.cancel()
        await asyncio.gather(streaming, watching, return_exceptions=True)

    async def _send_all(self, send: Callable) -> None:
        try:
            async for event in self.events:
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await self.events.aclose()

    @staticmethod
    async def _wait_disconnect(receive: Callable) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass


def _event(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


def _one_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


class ApiApp:
    """The app's state and handlers; `.app` is the ASGI app."""

    def __init__(self, backend: Any, tokenizer: Any, model_name: str, *, eos_id: int | None,
                 chat_template: ChatTemplate | None = None, api_key: str | None = None):
        self.backend = backend
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.eos_id = eos_id
        self.chat_template = chat_template
        self.api_key = api_key
        self.created = int(time.time())
        self.active = 0               # generations running now (a disconnected client's ends at once)
        self.app = Starlette(routes=[
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
        ], exception_handlers={404: self._not_found, 405: self._not_allowed})

    # ---- handlers -------------------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        try:
            self._check_key(request)
        except ApiError as e:
            return error_response(e)
        return JSONResponse(protocol.model_list(self.model_name, self.created))

    async def completions(self, request: Request) -> Response:
        try:
            self._check_key(request)
            req = protocol.parse_completion(await self._read_json(request))
            self._check_model(req.sampling)
            prompt_ids = self._prompt_ids(req.prompt)
            return await self._respond(prompt_ids, req.sampling, chat=False)
        except ApiError as e:
            return error_response(e)

    async def chat_completions(self, request: Request) -> Response:
        try:
            self._check_key(request)
            req = protocol.parse_chat(await self._read_json(request))
            self._check_model(req.sampling)
            if self.chat_template is None:
                raise ApiError(400, f"model {self.model_name} has no chat template (no chat_template in its "
                                    "tokenizer_config.json); use /v1/completions", param="messages",
                               code="no_chat_template")
            try:
                text = self.chat_template.render(req.messages, add_generation_prompt=True)
            except UserError as e:
                raise ApiError(400, str(e), param="messages") from None
            return await self._respond(self._prompt_ids(text), req.sampling, chat=True)
        except ApiError as e:
            return error_response(e)

    async def _not_found(self, request: Request, exc: Exception) -> Response:
        return error_response(ApiError(404, f"no route {request.method} {request.url.path}", code="not_found"))

    async def _not_allowed(self, request: Request, exc: Exception) -> Response:
        return error_response(ApiError(405, f"{request.method} is not allowed on {request.url.path}"))

    # ---- checks ---------------------------------------------------------------------------------

    def _check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")

    async def _read_json(self, request: Request) -> Any:
        # an oversized body is read on (not kept) up to a bound, so the client, still sending, gets the 413
        body, seen = bytearray(), 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen <= MAX_BODY_BYTES:
                body += chunk
            elif seen > DRAIN_BODY_BYTES:
                break
        if seen > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes", code="body_too_large")
        try:
            return json.loads(body)
        except ValueError as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None

    def _check_model(self, sampling: Sampling) -> None:
        if sampling.model != self.model_name:
            raise ApiError(404, f"The model `{sampling.model}` does not exist (this server serves "
                                f"`{self.model_name}`)", param="model", code="model_not_found")

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ApiError(400, "the prompt encodes to no tokens", param="prompt")
        if any(t >= self.tokenizer.vocab_size for t in ids):
            raise ApiError(400, f"prompt has token ids outside the vocabulary (0..{self.tokenizer.vocab_size - 1})",
                           param="prompt")
        return ids

    # ---- generation -----------------------------------------------------------------------------

    async def _pieces(self, prompt_ids: list[int], s: Sampling, max_new_tokens: int) -> AsyncIterator[Piece]:
        """Text pieces as generation goes; the last one carries the finish reason."""
        text = TextStream(self.tokenizer.decode, s.stop)
        seed = s.seed if s.seed is not None else secrets.randbits(63)
        tokens = self.backend.tokens(prompt_ids, max_new_tokens=max_new_tokens, temperature=s.temperature,
                                     top_p=s.top_p, seed=seed, eos_id=self.eos_id)
        n = 0
        self.active += 1
        try:
            async for token in tokens:
                n += 1
                if token == self.eos_id:
                    yield Piece(text.finish(), "stop", n)
                    return
                piece = text.push(token)
                if text.stopped:
                    yield Piece(piece, "stop", n)
                    return
                if piece:
                    yield Piece(piece, None, n)
            yield Piece(text.finish(), "length", n)
        except UserError as e:
            raise ApiError(400, str(e)) from None
        except AccessRefused as e:         # a server's admission policy (the ledger) said no: a quota, not a fault
            raise ApiError(429, _one_line(e), type="insufficient_quota" if "quota exceeded" in str(e) else "requests",
                           code="access_refused") from None
        except NotFoundError as e:
            raise ApiError(503, f"the swarm cannot serve model {self.model_name} now: {e}", type="server_error",
                           code="swarm_unavailable") from None
        except SwarmError as e:
            raise ApiError(503, f"generation through the swarm failed: {e}", type="server_error",
                           code="swarm_unavailable") from None
        finally:
            self.active -= 1
            await tokens.aclose()

    async def _respond(self, prompt_ids: list[int], s: Sampling, *, chat: bool) -> Response:
        max_new = protocol.check_length(len(prompt_ids), s.max_tokens, s.max_tokens_given, self.backend.context_len)
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        created = int(time.time())
        pieces = self._pieces(prompt_ids, s, max_new)
        try:
            first = await anext(pieces)        # errors before the first text get their own status
        except BaseException:
            await pieces.aclose()
            raise
        if not s.stream:
            try:
                texts, last = [first.text], first
                async for piece in pieces:
                    texts.append(piece.text)
                    last = piece
            finally:
                await pieces.aclose()
            make = protocol.chat_completion if chat else protocol.completion
            return JSONResponse(make(rid, created, self.model_name, "".join(texts), last.finish_reason,
                                     len(prompt_ids), last.n_tokens))
        return EventStream(self._events(first, pieces, rid, created, len(prompt_ids), s, chat=chat))

    async def _events(self, first: Piece, pieces: AsyncIterator[Piece], rid: str, created: int, n_prompt: int,
                      s: Sampling, *, chat: bool) -> AsyncIterator[bytes]:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(piece: Piece) -> dict[str, Any]:
            if chat:
                delta = {"content": piece.text} if piece.text or piece.finish_reason is None else {}
                return protocol.chat_chunk(rid, created, self.model_name, delta, piece.finish_reason)
            return protocol.completion_chunk(rid, created, self.model_name, piece.text, piece.finish_reason)

        try:
            if chat:
                yield _event(protocol.chat_chunk(rid, created, self.model_name,
                                                 {"role": "assistant", "content": ""}, None))
            last = first
            yield _event(chunk(first))
            async for piece in pieces:
                last = piece
                if piece.text or piece.finish_reason:
                    yield _event(chunk(piece))
            if s.include_usage:
                yield _event(protocol.usage_chunk(rid, created, self.model_name, obj, n_prompt, last.n_tokens))
        except ApiError as e:
            yield _event(e.body())
        finally:
            await pieces.aclose()
        yield b"data: [DONE]\n\n"


async def serve(app: Any, host: str, port: int, *, stop: asyncio.Event,
                on_ready: Callable[[str], None] = lambda url: None) -> None:
    """Run `app` on host:port (web.py; 0: a free port) until `stop` is set; `on_ready(base_url)`
    (its .../v1 URL) once it accepts connections."""
    await serve_app(app, host, port, stop=stop, on_ready=lambda url: on_ready(url + "/v1"), graceful_s=5)


