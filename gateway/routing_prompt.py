"""The prompt a request body will give the engine, for a router that sees only the raw body (the
HAProxy route chooser of direct streaming): a chat body's rendered messages, a completion body's
first prompt. A body that is not a valid request gives no prompt; the replica it lands on answers
it with the proper error."""

from __future__ import annotations

import json

from gateway.chat import render_chat
from gateway.errors import APIError
from gateway.openai_completions import completion_prompts
from gateway.schemas import ChatCompletionRequest, CompletionRequest
from mimo.tokenizer import Tokenizer


def routing_prompt(body: bytes, tokenizer: Tokenizer, default_thinking: bool = False) -> list[int]:
    """Token ids of the request's (first) prompt, or [] when the body is not a chat or completion
    request this API would accept (`default_thinking`: the server's mode, as the replica renders)."""
    try:
        data = json.loads(body)
        if not isinstance(data, dict):
            return []
        if "messages" in data:
            request = ChatCompletionRequest.model_validate(data)
            return render_chat(request, tokenizer, default_thinking).prompt_token_ids
        if "prompt" in data:
            return completion_prompts(CompletionRequest.model_validate(data), tokenizer)[0]
    except (ValueError, APIError):  # json's and pydantic's errors are ValueErrors
        return []
    return []
