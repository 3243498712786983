"""Renders chat prompts from OpenAI-style messages with a Jinja chat template, as transformers does.

The Jinja environment copies Hugging Face's `apply_chat_template` (sandbox, trim_blocks, lstrip_blocks,
the same `tojson`), and messages are normalised the way transformers and vLLM normalise them, so a
prompt rendered here is byte-identical to transformers' for the same template and inputs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

DEFAULT_TEMPLATE_PATH = Path(__file__).with_name("chat_template.jinja")

# Names clients use for a message's reasoning; the template reads the first (transformers' order).
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")

Message = Mapping[str, Any]
Tool = Mapping[str, Any]


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters; transformers overrides it with plain json.dumps.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _normalize_message(message: Message) -> dict[str, Any]:
    # transformers drops None values (OpenAI clients send `content: null`, `tool_calls: null`) ...
    out = {key: value for key, value in message.items() if value is not None}
    # ... and reads reasoning under any of its names.
    reasoning = next((out[key] for key in _REASONING_KEYS if key in out), None)
    if reasoning is not None:
        out["reasoning_content"] = reasoning
    if "tool_calls" in out:
        out["tool_calls"] = [_normalize_tool_call(call) for call in out["tool_calls"]]
    return out


def _normalize_tool_call(call: Mapping[str, Any]) -> dict[str, Any]:
    # OpenAI sends arguments as a JSON string; templates iterate a mapping (vLLM parses them the same way).
    function = call.get("function", call)
    arguments = function.get("arguments")
    if not isinstance(arguments, str):
        return dict(call)
    name = function.get("name")
    try:
        parsed = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"tool call {name!r}: arguments are not valid JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise ValueError(f"tool call {name!r}: arguments must be a JSON object")
    function = {**function, "arguments": parsed}
    return {**call, "function": function} if "function" in call else function


def normalize_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Messages as the template expects them: no None values, `reasoning_content`, dict arguments."""
    return [_normalize_message(message) for message in messages]


class ChatTemplate:
    """A compiled chat template; `render` turns messages (+ tools) into the prompt string."""

    def __init__(self, source: str) -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        self.source = source
        self._template = env.from_string(source)

    @classmethod
    def default(cls) -> ChatTemplate:
        """The template shipped with this package (`mimo/chat_template.jinja`)."""
        return cls(DEFAULT_TEMPLATE_PATH.read_text(encoding="utf-8"))

    def render(
        self,
        messages: Sequence[Message],
        tools: Sequence[Tool] | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> str:
        """The prompt text; `template_kwargs` reach the template (e.g. `enable_thinking=True`)."""
        return self._template.render(
            messages=normalize_messages(messages),
            tools=[dict(tool) for tool in tools] if tools is not None else None,
            add_generation_prompt=add_generation_prompt,
            **template_kwargs,
        )
