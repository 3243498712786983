"""Tool calls out of streamed content: plain text passes through, each `<tool_call>` block is held
until it closes, then becomes one call (name first, then its typed arguments), parsed exactly as the
non-streaming parser (`gateway/tool_calls.py`) does. A block that never closes or does not parse is
given back as content, as the non-streaming parser leaves it. Newlines around blocks are layout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.tool_calls import ToolCall, parse_tool_calls

OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclass
class ToolDelta:
    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)


def _partial_suffix(text: str, tag: str) -> int:
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ToolCallStream:
    def __init__(self, tools: Sequence[Mapping[str, Any]]) -> None:
        self._tools = tools
        self._buffer = ""
        self._held_space = ""  # trailing whitespace of content: dropped if a block follows
        self.num_calls = 0

    def push(self, text: str) -> ToolDelta:
        self._buffer += text
        out = ToolDelta()
        while True:
            start = self._buffer.find(OPEN)
            if start < 0:
                keep = _partial_suffix(self._buffer, OPEN)
                out.content += self._emit(self._buffer[: len(self._buffer) - keep])
                self._buffer = self._buffer[len(self._buffer) - keep :]
                return out
            out.content += self._emit(self._buffer[:start])
            end = self._buffer.find(CLOSE, start)
            if end < 0:
                self._buffer = self._buffer[start:]
                return out
            block = self._buffer[start : end + len(CLOSE)]
            self._buffer = self._buffer[end + len(CLOSE) :]
            parsed = parse_tool_calls(block, self._tools)
            if parsed.calls:
                self._held_space = ""
                out.calls.extend(parsed.calls)
                self.num_calls += len(parsed.calls)
                self._buffer = self._buffer.lstrip()
            else:
                out.content += self._emit(block)

    def finish(self) -> ToolDelta:
        rest, self._buffer = self._buffer, ""
        out = ToolDelta(content=self._emit(rest))
        if not self.num_calls:
            out.content += self._held_space
        self._held_space = ""
        return out

    def _emit(self, text: str) -> str:
        if not text:
            return ""
        body = text.rstrip()
        if not body:
            self._held_space += text
            return ""
        out = self._held_space + body
        self._held_space = text[len(body) :]
        return out
