"""Chat templates: a conversation rendered into one prompt with the checkpoint's own Jinja template.

The template is `chat_template` in the checkpoint's `tokenizer_config.json`, rendered as
transformers' `apply_chat_template(..., add_generation_prompt=True)` renders it: in Jinja's
`ImmutableSandboxedEnvironment` (templates are untrusted code), with the same options, filters
and globals, and the tokenizer's special tokens as variables. Knows nothing of HTTP or models.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from swarmlm.errors import CheckpointError, UserError

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTemplate:
    """A compiled chat template and the special tokens it may read."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        import jinja2
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateError as e:
            raise CheckpointError(f"the chat template does not compile: {e}") from None

    @classmethod
    def load(cls, directory: str | Path) -> "ChatTemplate | None":
        """The template of a checkpoint directory, or None when its tokenizer_config.json has none."""
        file = Path(directory) / "tokenizer_config.json"
        if not file.is_file():
            return None
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{file} is not valid JSON: {e}") from None
        source = config.get("chat_template")
        if isinstance(source, list):        # named templates: transformers uses "default"
            source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"),
                          None)
        if source is None:
            return None
        if not isinstance(source, str):
            raise CheckpointError(f"{file}: chat_template must be a string")
        special = {}
        for name in SPECIAL_TOKENS:
            value = config.get(name)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                special[name] = value
        return cls(source, special)

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages`; a template's own raise_exception becomes a UserError."""
        import jinja2

        try:
            return self._template.render(**self.special_tokens, messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt)
        except jinja2.TemplateError as e:
            raise UserError(f"the chat template refused the conversation: {e}") from None


def _environment():
    """Jinja set up as transformers sets it up for chat templates (chat_template_utils.py)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        # Jinja's own tojson escapes HTML characters, which a prompt must not
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env
