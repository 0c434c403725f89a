"""OpenAI's request and response shapes, as pure functions: JSON bodies in, checked requests out;
results in, the JSON objects OpenAI's clients expect out.

Knows nothing of HTTP, models or tokenizers: the server (server.py) reads bodies and writes
responses, and turns an `ApiError` into OpenAI's error JSON with its status.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

MAX_STOPS = 4                 # OpenAI's limit on stop strings per request
DEFAULT_COMPLETION_TOKENS = 16   # /v1/completions' max_tokens when none is given (OpenAI's default)


class ApiError(Exception):
    """A request the server answers with OpenAI's error JSON and an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass(frozen=True)
class Sampling:
    """What every generation request shares, checked."""
    model: str
    max_tokens: int | None        # None: as many as the context leaves
    max_tokens_given: bool = False  # the client asked for max_tokens (past the context is then an error)
    temperature: float = 1.0      # 0 is greedy
    top_p: float = 1.0
    seed: int | None = None       # None: a fresh random seed
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False   # stream_options.include_usage: a last chunk with usage


@dataclass(frozen=True)
class CompletionRequest:
    prompt: str | list[int]       # text, or token ids
    sampling: Sampling


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, Any]]  # {"role": str, "content": str}, content parts joined
    sampling: Sampling = field(default_factory=lambda: Sampling(model="", max_tokens=None))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _require_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    return body


def parse_sampling(body: dict[str, Any], *, default_max_tokens: int | None) -> Sampling:
    """The shared fields of a completion or chat body; raises ApiError (400) naming the bad field."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("you must provide a model parameter (a string)", "model")
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_completion_tokens")
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise bad(f"max_tokens must be an integer of at least 1, got {max_tokens!r}", "max_tokens")
    temperature = body.get("temperature", 1.0)
    temperature = 1.0 if temperature is None else temperature
    if not _is_number(temperature) or not 0 <= temperature <= 2:
        raise bad(f"temperature must be a number between 0 and 2, got {temperature!r}", "temperature")
    top_p = body.get("top_p", 1.0)
    top_p = 1.0 if top_p is None else top_p
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise bad(f"top_p must be a number in (0, 1], got {top_p!r}", "top_p")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise bad(f"seed must be an integer, got {seed!r}", "seed")
    n = body.get("n", 1)
    if n not in (None, 1) or isinstance(n, bool):
        raise bad("only n=1 is supported", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise bad(f"stream must be a boolean, got {stream!r}", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("stream_options must be an object", "stream_options")
    return Sampling(model=model, max_tokens=max_tokens if max_tokens is not None else default_max_tokens,
                    max_tokens_given=max_tokens is not None,
                    temperature=float(temperature), top_p=float(top_p), seed=seed,
                    stop=parse_stop(body.get("stop")), stream=bool(stream),
                    include_usage=bool(stream) and options.get("include_usage") is True)


def parse_stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOPS:
        raise bad(f"stop takes at most {MAX_STOPS} strings", "stop")
    return tuple(s for s in stops if s)


def parse_completion(body: Any) -> CompletionRequest:
    body = _require_object(body)
    if "prompt" not in body:
        raise bad("you must provide a prompt parameter", "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]                       # a batch of one
    if isinstance(prompt, list):
        if not prompt or not all(_is_int(t) and t >= 0 for t in prompt):
            raise bad("prompt must be a string, or a non-empty list of token ids (one prompt per request)", "prompt")
    elif not isinstance(prompt, str):
        raise bad("prompt must be a string or a list of token ids", "prompt")
    if body.get("echo") or body.get("logprobs") not in (None, 0, False) or body.get("best_of") not in (None, 1):
        raise bad("echo, logprobs and best_of are not supported")
    return CompletionRequest(prompt, parse_sampling(body, default_max_tokens=DEFAULT_COMPLETION_TOKENS))


def parse_chat(body: Any) -> ChatRequest:
    body = _require_object(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list", "messages")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise bad(f"messages[{i}] must be an object with a string role", f"messages.[{i}].role")
        checked.append({**message, "content": _content_text(message.get("content"), i)})
    if body.get("logprobs") or body.get("tools"):
        raise bad("logprobs and tools are not supported")
    return ChatRequest(checked, parse_sampling(body, default_max_tokens=None))


def _content_text(content: Any, i: int) -> str:
    """A message's content as text: a string, or text parts joined (other parts are refused)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise bad(f"messages[{i}].content must be a string or a list of text parts", f"messages.[{i}].content")


def check_length(n_prompt: int, max_tokens: int | None, explicit: bool, context_len: int) -> int:
    """How many tokens to generate: `max_tokens` (None: all the context leaves); a prompt longer than
    the context, or an explicit max_tokens past it, is OpenAI's context_length_exceeded."""
    room = context_len - n_prompt
    if room < 1 or (explicit and max_tokens is not None and max_tokens > room):
        asked = n_prompt + (max_tokens if explicit and max_tokens else 0)
        raise bad(f"This model's maximum context length is {context_len} tokens. However, you requested "
                  f"{asked} tokens ({n_prompt} in the prompt, {asked - n_prompt} in the completion). "
                  f"Please reduce the length of the prompt or the completion.", code="context_length_exceeded")
    return room if max_tokens is None else min(max_tokens, room)


# ---- responses ------------------------------------------------------------------------------------

def usage(n_prompt: int, n_completion: int) -> dict[str, int]:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion}


def completion(id: str, created: int, model: str, text: str, finish_reason: str,
               n_prompt: int, n_completion: int) -> dict[str, Any]:
    return {"id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage(n_prompt, n_completion)}


def completion_chunk(id: str, created: int, model: str, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


def chat_completion(id: str, created: int, model: str, text: str, finish_reason: str,
                    n_prompt: int, n_completion: int) -> dict[str, Any]:
    return {"id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage(n_prompt, n_completion)}


def chat_chunk(id: str, created: int, model: str, delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
    return {"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(id: str, created: int, model: str, obj: str, n_prompt: int, n_completion: int) -> dict[str, Any]:
    return {"id": id, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(n_prompt, n_completion)}


def model_list(model: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "swarmlm"}]}
