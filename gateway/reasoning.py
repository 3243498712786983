"""Splits a completion's text into `reasoning_content` and `content`, incrementally.

With thinking on, MiMo writes `<think>\\n...\\n</think>\\n\\n` before its answer; with thinking off the
prompt already holds the empty block, so all output is content. Text that could still become
`</think>` (or the reasoning's trailing newline) is held back, so pieces never need retracting; a
stream that ends inside the block is all reasoning (as vLLM's parsers do).
"""

from __future__ import annotations

from dataclasses import dataclass

OPEN, CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class Split:
    reasoning: str = ""
    content: str = ""


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningStream:
    def __init__(self, enabled: bool) -> None:
        self._state = "start" if enabled else "content"
        self._buffer = ""
        self._reasoning_started = False
        self._content_started = False

    def push(self, text: str) -> Split:
        self._buffer += text
        reasoning = content = ""
        if self._state == "start":
            stripped = self._buffer.lstrip()
            if stripped.startswith(OPEN):
                self._state = "reasoning"
                self._buffer = stripped[len(OPEN) :]
            elif OPEN.startswith(stripped):
                return Split()  # might still become <think>
            else:
                self._state = "content"
        if self._state == "reasoning":
            if not self._reasoning_started:  # the newline after <think> may come in a later chunk
                self._buffer = self._buffer.lstrip("\n")
                self._reasoning_started = bool(self._buffer)
            index = self._buffer.find(CLOSE)
            if index >= 0:
                reasoning = self._buffer[:index].rstrip()
                self._buffer = self._buffer[index + len(CLOSE) :]
                self._state = "content"
            else:
                keep = max(
                    _partial_suffix(self._buffer, CLOSE), len(self._buffer) - len(self._buffer.rstrip())
                )
                reasoning, self._buffer = (
                    self._buffer[: len(self._buffer) - keep],
                    self._buffer[len(self._buffer) - keep :],
                )
        if self._state == "content":
            if not self._content_started:
                self._buffer = self._buffer.lstrip()
                self._content_started = bool(self._buffer)
            content, self._buffer = self._buffer, ""
        return Split(reasoning, content)

    def finish(self) -> Split:
        rest, self._buffer = self._buffer, ""
        if self._state == "reasoning":
            return Split(rest.rstrip(), "")
        if self._state == "start":
            return Split("", rest.lstrip())
        return Split("", rest)


def split_reasoning(text: str, enabled: bool) -> Split:
    stream = ReasoningStream(enabled)
    first, last = stream.push(text), stream.finish()
    return Split(first.reasoning + last.reasoning, first.content + last.content)
