"""A chat request as a prompt: messages and tools through MiMo's chat template, plus `tool_choice`.

`none` leaves the tools out of the prompt (the model is not tempted to call them); `required` and a
named choice prefill the assistant turn with the opening of a call (`<tool_call>\\n`, and the
`<function=NAME>` line), which steers even a small model; the prefill is part of the output text for
parsing. Forced calls render with thinking off: a call cannot follow an unfinished thought.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.errors import APIError
from gateway.schemas import ChatCompletionRequest, NamedToolChoice
from mimo.tokenizer import Tokenizer


@dataclass(frozen=True)
class RenderedChat:
    prompt_token_ids: list[int]
    prefill: str  # assistant text already in the prompt, parsed as the start of the output
    tools: list[dict[str, Any]]  # schemas for typing arguments; empty = do not parse tool calls
    enable_thinking: bool


def render_chat(
    request: ChatCompletionRequest, tokenizer: Tokenizer, default_thinking: bool = False
) -> RenderedChat:
    """`default_thinking`: the server's mode for a request that says nothing about thinking."""
    tools = [tool.model_dump(exclude_none=True) for tool in request.tools or []]
    choice = request.tool_choice if request.tool_choice is not None else ("auto" if tools else "none")
    try:
        enable_thinking = request.thinking_mode(default_thinking)
    except ValueError as e:
        raise APIError(400, str(e), "thinking.type", "conflicting_parameters") from None
    prefill = ""
    if choice != "none" and not tools:
        raise APIError(400, "tool_choice needs tools", "tool_choice")
    if isinstance(choice, NamedToolChoice):
        names = [t["function"]["name"] for t in tools]
        if choice.function.name not in names:
            raise APIError(400, f"tool_choice names {choice.function.name!r}, not among tools", "tool_choice")
        prefill = f"<tool_call>\n<function={choice.function.name}>\n"
    elif choice == "required":
        prefill = "<tool_call>\n"
    if prefill:
        enable_thinking = False
    messages = [m.model_dump(exclude_none=True) for m in request.messages]
    for message in messages:
        if message["role"] == "developer":
            message["role"] = "system"
    try:
        text = tokenizer.render_chat(
            messages,
            tools if choice != "none" else None,
            add_generation_prompt=True,
            enable_thinking=enable_thinking,
        )
    except ValueError as e:  # e.g. tool-call arguments that are not a JSON object
        raise APIError(400, str(e), "messages") from None
    except Exception as e:  # jinja TemplateError: a conversation the template refuses
        raise APIError(400, f"messages cannot be rendered: {e}", "messages") from None
    return RenderedChat(
        prompt_token_ids=tokenizer.encode(text + prefill),
        prefill=prefill,
        tools=tools if choice != "none" else [],
        enable_thinking=enable_thinking,
    )
