"""POST /v1/completions: plain-text (or token-id) prompts, n choices per prompt, echo, logprobs in
the legacy completions shape; JSON or SSE."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi.responses import JSONResponse, Response

from gateway.assemble import token_text
from gateway.auth import Tenant
from gateway.engine_client import EngineError
from gateway.errors import APIError, generation_failed
from gateway.fanout import EngineCall, FanOut
from gateway.params import check_prompt, engine_params
from gateway.schemas import DEFAULT_MAX_TOKENS, CompletionRequest
from gateway.sse import EventStream, sse_done, sse_error, sse_event, usage_body
from mimo.tokenizer import Tokenizer
from protocol.messages import Chunk, GenerateRequest

if TYPE_CHECKING:
    from gateway.api import Gateway


def completion_prompts(body: CompletionRequest, tokenizer: Tokenizer) -> list[list[int]]:
    prompt = body.prompt
    if isinstance(prompt, str):
        return [tokenizer.encode(prompt)]
    if not prompt:
        raise APIError(400, "prompt is empty", "prompt")
    ids = [p for p in prompt if isinstance(p, int)]
    if len(ids) == len(prompt):  # one prompt of token ids
        return [ids]
    texts = [p for p in prompt if isinstance(p, str)]
    if len(texts) == len(prompt):
        return [tokenizer.encode(p) for p in texts]
    return [list(p) for p in prompt if isinstance(p, list)]


def _logprobs(tokenizer: Tokenizer, chunk: Chunk, offset: int) -> dict[str, Any]:
    tokens = [token_text(tokenizer, t) for t in chunk.token_ids]
    offsets, at = [], offset
    for text in tokens:
        offsets.append(at)
        at += len(text)
    logprobs = chunk.logprobs.logprobs if chunk.logprobs else []
    top = [
        {token_text(tokenizer, t): lp for t, lp in row}
        for row in (chunk.logprobs.top if chunk.logprobs else [])
    ]
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top, "text_offset": offsets}


async def completion(state: Gateway, tenant: Tenant, body: CompletionRequest, rid: str) -> Response:
    config = state.config
    if body.echo and body.logprobs is not None:
        raise APIError(400, "echo together with logprobs is not supported", "echo")
    prompts = completion_prompts(body, state.tokenizer)
    vocab = state.tokenizer.vocab_size
    calls = []
    for p, ids in enumerate(prompts):
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
        check_prompt(len(ids), config.max_model_len, config.max_prompt_tokens, "prompt")
        for j in range(body.n):
            params = engine_params(
                body,
                body.max_tokens if "max_tokens" in body.model_fields_set else None,
                len(ids),
                config.max_model_len,
                body.logprobs,
                j,
                config.sampling_defaults,
                api_max_tokens=DEFAULT_MAX_TOKENS,
            )
            request = GenerateRequest(f"{rid}-{p}-{j}", ids, params, tenant.cache_salt)
            calls.append(EngineCall(p * body.n + j, request))
    await state.admit(tenant, sum(len(ids) for ids in prompts) * body.n)
    fanout = FanOut(state.client, calls)
    await fanout.start()
    echoes = [state.tokenizer.decode(ids) if body.echo else "" for ids in prompts for _ in range(body.n)]
    head = {"id": f"cmpl-{rid}", "created": int(time.time()), "model": body.model}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStream(_stream(state, tenant, fanout, body, head, echoes, include_usage))
    texts = list(echoes)
    finish: list[str | None] = [None] * len(calls)
    logprobs: list[dict[str, Any] | None] = [None] * len(calls)
    prompt_tokens = completion_tokens = cached = 0
    async for index, chunk in fanout.chunks():
        if body.logprobs is not None:
            part = _logprobs(state.tokenizer, chunk, len(texts[index]))
            old = logprobs[index]
            logprobs[index] = part if old is None else {k: old[k] + part[k] for k in part}
        texts[index] += chunk.text
        if chunk.finish_reason is not None:
            if chunk.error:
                raise generation_failed(chunk)
            finish[index] = chunk.finish_reason
            if chunk.usage is not None:
                completion_tokens += chunk.usage.completion_tokens
                cached += chunk.usage.cached_tokens
    prompt_tokens = sum(len(ids) for ids in prompts) * body.n
    state.charge(tenant, completion_tokens)
    choices = [
        {"index": i, "text": texts[i], "logprobs": logprobs[i], "finish_reason": finish[i]}
        for i in range(len(calls))
    ]
    return JSONResponse(
        {
            **head,
            "object": "text_completion",
            "choices": choices,
            "usage": usage_body(prompt_tokens, completion_tokens, cached),
        }
    )


async def _stream(
    state: Gateway,
    tenant: Tenant,
    fanout: FanOut,
    body: CompletionRequest,
    head: dict[str, Any],
    echoes: list[str],
    include_usage: bool,
) -> AsyncIterator[str]:
    head = {**head, "object": "text_completion"}
    prompt_tokens = completion_tokens = cached = 0
    offsets = [len(e) for e in echoes]
    try:
        for index, echo in enumerate(echoes):
            if echo:
                yield sse_event(
                    {
                        **head,
                        "choices": [{"index": index, "text": echo, "logprobs": None, "finish_reason": None}],
                    }
                )
        async for index, chunk in fanout.chunks():
            if chunk.error:
                yield sse_error(generation_failed(chunk).message)
                continue
            lp = _logprobs(state.tokenizer, chunk, offsets[index]) if body.logprobs is not None else None
            offsets[index] += len(chunk.text)
            if chunk.finish_reason is not None and chunk.usage is not None:
                prompt_tokens += chunk.usage.prompt_tokens
                completion_tokens += chunk.usage.completion_tokens
                cached += chunk.usage.cached_tokens
            if chunk.text or chunk.finish_reason is not None:
                choice = {
                    "index": index,
                    "text": chunk.text,
                    "logprobs": lp,
                    "finish_reason": chunk.finish_reason,
                }
                yield sse_event({**head, "choices": [choice]})
        if include_usage:
            yield sse_event(
                {**head, "choices": [], "usage": usage_body(prompt_tokens, completion_tokens, cached)}
            )
        yield sse_done()
    except EngineError as e:
        yield sse_error(e.refusal.message, e.refusal.param)
        yield sse_done()
    finally:
        await fanout.close()  # a stream closed early (client gone) aborts its engine requests
        state.charge(tenant, completion_tokens)
