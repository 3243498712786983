"""Parses Qwen3-Coder XML tool calls out of a finished MiMo completion.

The model writes `<tool_call>`, `<function=NAME>`, one `<parameter=P>\\nVALUE\\n</parameter>` per
argument, `</function>`, `</tool_call>`, one per line. Values are plain text, typed here by the tool's
JSON schema (as SGLang's "mimo" and vLLM's "qwen3_xml" parsers do). Malformed blocks, and calls to
a function the request's tools do not define, stay in the content: the parser never raises, and a
client never gets a call it cannot dispatch.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# A block may not contain another opening tag, so an unclosed block cannot swallow the next one.
_BLOCK_RE = re.compile(r"<tool_call>((?:(?!<tool_call>).)*?)</tool_call>", re.DOTALL)
_FUNCTION_RE = re.compile(r"\s*<function=([^>\n]+)>(.*?)</function>\s*", re.DOTALL)
_PARAMETER_RE = re.compile(r"\s*<parameter=([^>\n]+)>(.*?)</parameter>", re.DOTALL)
# Types tried for a value, in this order, when a schema allows several; string always fits, so last.
_TYPE_ORDER = ("null", "boolean", "integer", "number", "object", "array", "string")


@dataclass(frozen=True)
class ToolCall:
    """One call: the function name and its arguments as a JSON object string (OpenAI's shape)."""

    name: str
    arguments_json: str


@dataclass(frozen=True)
class ParsedToolCalls:
    """The text outside well-formed tool-call blocks, and the calls in order."""

    content: str
    calls: list[ToolCall] = field(default_factory=list)


def _strip_one_newline(value: str) -> str:
    # The format puts exactly one newline after <parameter=P> and one before </parameter>.
    value = value.removeprefix("\n")
    return value.removesuffix("\n")


def _schema_types(tools: Sequence[Mapping[str, Any]], function: str, parameter: str) -> list[str]:
    for tool in tools:
        spec = tool.get("function", tool)
        if spec.get("name") != function:
            continue
        prop = spec.get("parameters", {}).get("properties", {}).get(parameter, {})
        declared = prop.get("type") if isinstance(prop, Mapping) else None
        types = [declared] if isinstance(declared, str) else list(declared or [])
        return [t for t in _TYPE_ORDER if t in types]
    return []


def _convert(raw: str, type_name: str) -> tuple[bool, Any]:
    """(True, typed value) when `raw` reads as `type_name`, else (False, None)."""
    text = raw.strip()
    if type_name == "string":
        return True, raw
    if type_name == "null":
        return (True, None) if text.lower() in ("null", "none") else (False, None)
    if type_name == "boolean":
        lowered = text.lower()
        return (True, lowered == "true") if lowered in ("true", "false") else (False, None)
    if type_name == "integer":
        try:
            return True, int(text)
        except ValueError:
            return False, None
    if type_name == "number":
        try:
            return True, int(text)
        except ValueError:
            pass
        try:
            number = float(text)
        except ValueError:
            return False, None
        # NaN and infinity have no JSON spelling.
        return (True, number) if math.isfinite(number) else (False, None)
    if type_name in ("object", "array"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return False, None
        expected = dict if type_name == "object" else list
        return (True, value) if isinstance(value, expected) else (False, None)
    return False, None


def _typed_value(raw: str, types: list[str]) -> Any:
    value = _strip_one_newline(raw)
    for type_name in types:
        ok, typed = _convert(value, type_name)
        if ok:
            return typed
    # Unknown tool, unknown parameter, untyped schema or a value that fits no declared type: keep the text.
    return value


def _tool_names(tools: Sequence[Mapping[str, Any]]) -> set[str]:
    return {str(tool.get("function", tool).get("name")) for tool in tools}


def _parse_block(body: str, tools: Sequence[Mapping[str, Any]], known: set[str] | None) -> ToolCall | None:
    function = _FUNCTION_RE.fullmatch(body)
    if function is None:
        return None
    name, params_text = function.group(1).strip(), function.group(2)
    if known is not None and name not in known:
        return None
    arguments: dict[str, Any] = {}
    end = 0
    for param in _PARAMETER_RE.finditer(params_text):
        if param.start() != end:  # text between parameters: not the format
            return None
        key = param.group(1).strip()
        arguments[key] = _typed_value(param.group(2), _schema_types(tools, name, key))
        end = param.end()
    if params_text[end:].strip():
        return None
    return ToolCall(name, json.dumps(arguments, ensure_ascii=False))


def parse_tool_calls(text: str, tools: Sequence[Mapping[str, Any]] | None = None) -> ParsedToolCalls:
    """Splits `text` into content and tool calls; arguments are typed by `tools` (OpenAI tool
    schemas), and when `tools` is given only its functions count as calls (None: any name)."""
    known = None if tools is None else _tool_names(tools)
    tools = tools or []
    calls: list[ToolCall] = []
    content_parts: list[str] = []
    end = 0
    for block in _BLOCK_RE.finditer(text):
        call = _parse_block(block.group(1), tools, known)
        if call is None:
            continue  # malformed: stays in the content
        content_parts.append(text[end : block.start()])
        calls.append(call)
        end = block.end()
    if not calls:
        return ParsedToolCalls(text, [])
    content_parts.append(text[end:])
    # The template separates content and blocks with newlines; they are layout, not content.
    return ParsedToolCalls("".join(content_parts).strip(), calls)
