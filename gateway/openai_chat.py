"""POST /v1/chat/completions: render, fan out n engine requests, assemble choices (reasoning,
content, tool calls, logprobs), answer as one JSON body or as SSE chunks."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi.responses import JSONResponse, Response

from gateway.assemble import ChoiceAssembler, ChoiceDelta
from gateway.auth import Tenant
from gateway.chat import render_chat
from gateway.engine_client import EngineError
from gateway.errors import generation_failed
from gateway.fanout import EngineCall, FanOut
from gateway.params import check_prompt, engine_params
from gateway.schemas import ChatCompletionRequest
from gateway.sse import EventStream, sse_done, sse_error, sse_event, usage_body
from protocol.messages import Chunk, GenerateRequest

if TYPE_CHECKING:
    from gateway.api import Gateway


async def chat_completion(state: Gateway, tenant: Tenant, body: ChatCompletionRequest, rid: str) -> Response:
    config = state.config
    rendered = render_chat(body, state.tokenizer, config.default_thinking)
    num_prompt = len(rendered.prompt_token_ids)
    check_prompt(num_prompt, config.max_model_len, config.max_prompt_tokens, "messages")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    num_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    calls = [
        EngineCall(
            i,
            GenerateRequest(
                f"{rid}-{i}",
                rendered.prompt_token_ids,
                engine_params(
                    body,
                    max_tokens,
                    num_prompt,
                    config.max_model_len,
                    num_logprobs,
                    i,
                    config.sampling_defaults,
                ),
                tenant.cache_salt,
            ),
        )
        for i in range(body.n)
    ]
    await state.admit(tenant, num_prompt * body.n)
    fanout = FanOut(state.client, calls)
    await fanout.start()
    assemblers = [
        ChoiceAssembler(state.tokenizer, rendered.enable_thinking, rendered.tools, rendered.prefill)
        for _ in range(body.n)
    ]
    response_id, created = f"chatcmpl-{rid}", int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = _stream(state, tenant, fanout, assemblers, body, response_id, created, include_usage)
        return EventStream(stream)
    return JSONResponse(await _collect(state, tenant, fanout, assemblers, body, response_id, created))


def _usage(usage: list[int], last: Chunk) -> list[int]:
    """[prompt, completion, cached] after a choice's last chunk: completions add up over choices."""
    u = last.usage
    return usage if u is None else [u.prompt_tokens, usage[1] + u.completion_tokens, u.cached_tokens]


async def _collect(
    state: Gateway,
    tenant: Tenant,
    fanout: FanOut,
    assemblers: list[ChoiceAssembler],
    body: ChatCompletionRequest,
    response_id: str,
    created: int,
) -> dict[str, Any]:
    merged = [ChoiceDelta() for _ in assemblers]
    usage = [0, 0, 0]
    async for index, chunk in fanout.chunks():
        delta = assemblers[index].push(chunk, body.logprobs)
        total = merged[index]
        total.reasoning += delta.reasoning
        total.content += delta.content
        total.tool_calls += delta.tool_calls
        total.logprobs += delta.logprobs
        if chunk.finish_reason is not None:
            if chunk.error:
                raise generation_failed(chunk)
            total.finish_reason = delta.finish_reason
            usage = _usage(usage, chunk)
    state.charge(tenant, usage[1])
    choices = []
    for index, total in enumerate(merged):
        message: dict[str, Any] = {
            "role": "assistant",
            "content": total.content or (None if total.tool_calls else ""),
        }
        if total.reasoning:
            message["reasoning_content"] = total.reasoning
        if total.tool_calls:
            message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in total.tool_calls]
        choice: dict[str, Any] = {"index": index, "message": message, "finish_reason": total.finish_reason}
        choice["logprobs"] = {"content": total.logprobs} if body.logprobs else None
        choices.append(choice)
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": created,
        "model": body.model,
        "choices": choices,
        "usage": usage_body(*usage),
    }


async def _stream(
    state: Gateway,
    tenant: Tenant,
    fanout: FanOut,
    assemblers: list[ChoiceAssembler],
    body: ChatCompletionRequest,
    response_id: str,
    created: int,
    include_usage: bool,
) -> AsyncIterator[str]:
    head = {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": body.model}
    usage = [0, 0, 0]
    try:
        for index in range(len(assemblers)):
            yield sse_event(
                {
                    **head,
                    "choices": [
                        {
                            "index": index,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ],
                }
            )
        async for index, chunk in fanout.chunks():
            if chunk.error:
                yield sse_error(generation_failed(chunk).message)
                continue
            delta = assemblers[index].push(chunk, body.logprobs)
            if chunk.finish_reason is not None:
                usage = _usage(usage, chunk)
            if delta.is_empty():
                continue
            out: dict[str, Any] = {}
            if delta.reasoning:
                out["reasoning_content"] = delta.reasoning
            if delta.content:
                out["content"] = delta.content
            if delta.tool_calls:
                out["tool_calls"] = delta.tool_calls
            choice = {
                "index": index,
                "delta": out,
                "finish_reason": delta.finish_reason,
                "logprobs": {"content": delta.logprobs} if body.logprobs else None,
            }
            yield sse_event({**head, "choices": [choice]})
        if include_usage:
            yield sse_event({**head, "choices": [], "usage": usage_body(*usage)})
        yield sse_done()
    except EngineError as e:
        yield sse_error(e.refusal.message, e.refusal.param)
        yield sse_done()
    finally:
        await fanout.close()  # a stream closed early (client gone) aborts its engine requests
        state.charge(tenant, usage[1])
