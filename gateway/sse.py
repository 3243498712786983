"""Server-sent events in OpenAI's framing (`data: {json}\\n\\n`, then `data: [DONE]`) and the usage
object shared by every response."""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


class EventStream(StreamingResponse):
    """An SSE response that closes its body generator however the response ends. Starlette stops
    iterating when the client disconnects but leaves the generator suspended; closing it here runs
    the `finally` blocks that abort the engine requests and free their KV now, not at some GC."""

    def __init__(self, body: Any) -> None:
        super().__init__(body, media_type="text/event-stream")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


def sse_event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def sse_error(message: str, param: str | None = None) -> str:
    """An error inside a started stream (the status line is already sent): OpenAI's error object."""
    return sse_event({"error": {"message": message, "type": "server_error", "param": param, "code": None}})


def sse_done() -> str:
    return "data: [DONE]\n\n"


def usage_body(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }
