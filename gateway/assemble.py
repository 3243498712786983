"""One choice's output, piece by piece: text -> reasoning/content split -> tool calls, plus logprobs
and the finish reason. Streaming and non-streaming responses are both built from these deltas, so
they always agree.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.reasoning import ReasoningStream
from gateway.tool_stream import ToolCallStream
from mimo.tokenizer import Tokenizer
from protocol.messages import Chunk


@dataclass
class ChoiceDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # OpenAI tool_calls entries
    logprobs: list[dict[str, Any]] = field(default_factory=list)  # chat logprobs "content" entries
    finish_reason: str | None = None

    def is_empty(self) -> bool:
        return not (self.reasoning or self.content or self.tool_calls or self.logprobs or self.finish_reason)


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def chat_logprobs(tokenizer: Tokenizer, chunk: Chunk) -> list[dict[str, Any]]:
    if chunk.logprobs is None:
        return []
    entries = []
    tops = chunk.logprobs.top
    for i, (token_id, logprob) in enumerate(zip(chunk.token_ids, chunk.logprobs.logprobs, strict=False)):
        text = token_text(tokenizer, token_id)
        top = tops[i] if i < len(tops) else []
        entries.append(
            {
                "token": text,
                "logprob": logprob,
                "bytes": list(text.encode("utf-8")),
                "top_logprobs": [
                    {
                        "token": (t := token_text(tokenizer, tid)),
                        "logprob": lp,
                        "bytes": list(t.encode("utf-8")),
                    }
                    for tid, lp in top
                ],
            }
        )
    return entries


class ChoiceAssembler:
    def __init__(
        self,
        tokenizer: Tokenizer,
        enable_thinking: bool,
        tools: Sequence[Mapping[str, Any]],
        prefill: str = "",
    ) -> None:
        self._tokenizer = tokenizer
        self._reasoning = ReasoningStream(enable_thinking)
        self._tools = ToolCallStream(tools) if tools else None
        self._num_calls = 0
        self._pending_prefill = prefill

    def push(self, chunk: Chunk, want_logprobs: bool) -> ChoiceDelta:
        text = self._pending_prefill + chunk.text
        self._pending_prefill = ""
        split = self._reasoning.push(text)
        delta = ChoiceDelta(reasoning=split.reasoning)
        self._add_content(delta, split.content)
        if chunk.finish_reason is not None:
            tail = self._reasoning.finish()
            delta.reasoning += tail.reasoning
            self._add_content(delta, tail.content, final=True)
            delta.finish_reason = (
                "tool_calls" if self._num_calls and chunk.finish_reason == "stop" else chunk.finish_reason
            )
        if want_logprobs:
            delta.logprobs = chat_logprobs(self._tokenizer, chunk)
        return delta

    def _add_content(self, delta: ChoiceDelta, text: str, final: bool = False) -> None:
        if self._tools is None:
            delta.content += text
            return
        parts = [self._tools.push(text)] + ([self._tools.finish()] if final else [])
        for part in parts:
            delta.content += part.content
            for call in part.calls:
                delta.tool_calls.append(
                    {
                        "index": self._num_calls,
                        "id": f"call_{uuid.uuid4().hex[:24]}",
                        "type": "function",
                        "function": {"name": call.name, "arguments": call.arguments_json},
                    }
                )
                self._num_calls += 1
