"""The gateway's two ways to reach an engine: in process (`InProcessEngineClient`, for one-process
runs and fast API tests) and through Serve (`ServeEngineClient`, the cluster). Both go through
`stream_request`, the replica-side translation between the gateway's plain data and the engine.
"""

from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

from gateway.engine_client import EngineClient, EngineError, GenerationChunk
from replicas.async_engine import AsyncEngine
from replicas.engine import Chunk, GenerateRequest, InvalidRequest
from replicas.sampling_params import SamplingParams

_PARAM_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


def to_generation_chunk(chunk: Chunk) -> GenerationChunk:
    usage = chunk.usage
    return GenerationChunk(
        token_ids=list(chunk.token_ids),
        text=chunk.text,
        finish_reason=chunk.finish_reason,
        prompt_tokens=usage.prompt_tokens if usage else 0,
        completion_tokens=usage.completion_tokens if usage else 0,
        cached_tokens=usage.cached_tokens if usage else 0,
        queue_s=usage.queue_s if usage else 0.0,
        logprobs=list(chunk.logprobs.logprobs) if chunk.logprobs else [],
        top_logprobs=[list(row) for row in chunk.logprobs.top] if chunk.logprobs else [],
        error=chunk.error,
    )


def sampling_params(params: dict[str, Any]) -> SamplingParams:
    unknown = set(params) - _PARAM_FIELDS
    if unknown:
        raise EngineError(400, f"unknown sampling parameters {sorted(unknown)}", sorted(unknown)[0])
    values = dict(params)
    for key in ("stop", "stop_token_ids"):
        if key in values:
            values[key] = tuple(values[key])
    return SamplingParams(**values)


async def stream_request(
    engine: AsyncEngine,
    *,
    prompt_token_ids: list[int],
    salt: str | None,
    params: dict[str, Any],
    request_id: str,
    max_streams: int,
) -> AsyncGenerator[GenerationChunk, None]:
    """Runs one request on `engine`. Raises EngineError before the first chunk: 400 for a bad
    request (field named), 503 with Retry-After when `max_streams` requests are already in."""
    if engine.num_streams >= max_streams:
        raise EngineError(503, "attention replica is at capacity; retry shortly", None, 1.0)
    request = GenerateRequest(request_id, list(prompt_token_ids), sampling_params(params), salt)
    try:
        stream = await engine.submit(request)
    except InvalidRequest as e:
        raise EngineError(400, str(e), _api_param(e.field)) from None
    try:
        async for chunk in stream:
            yield to_generation_chunk(chunk)
    finally:
        await stream.aclose()  # closed early: the engine aborts the request and frees its KV


def _api_param(field: str) -> str:
    return {"prompt": "messages"}.get(field, field)


class InProcessEngineClient(EngineClient):
    def __init__(self, engine: AsyncEngine, max_streams: int = 1024) -> None:
        self.engine = engine
        self.max_streams = max_streams

    def generate(
        self, *, prompt_token_ids: list[int], salt: str | None, params: dict[str, Any], request_id: str
    ) -> AsyncIterator[GenerationChunk]:
        return stream_request(
            self.engine,
            prompt_token_ids=prompt_token_ids,
            salt=salt,
            params=params,
            request_id=request_id,
            max_streams=self.max_streams,
        )

    async def is_ready(self) -> bool:
        return self.engine.is_alive()


def _own_request_context(request_id: str) -> contextvars.Context:
    """A copy of this task's context in which Serve's request context carries `request_id` as its
    internal id. Serve's router keys pending requests by that id, which a handle call otherwise
    inherits from the HTTP request: the n sub-requests of one API call shared it, and Serve's
    routing loop, matching each chosen replica to the first of them, spun forever."""
    from ray.serve import context as serve_context

    copied = contextvars.copy_context()
    copied.run(serve_context._set_request_context, _internal_request_id=request_id)
    return copied


class ServeEngineClient(EngineClient):
    """Calls the Attention deployment's `generate` (a streaming method yielding chunk dicts; a
    refusal is a first item `{"error": {...}}`). A replica that dies mid-request ends the request
    with a retriable 503 error, never silently."""

    def __init__(self, handle: Any, is_ready: Callable[[], Awaitable[bool]]) -> None:
        self.handle = handle.options(stream=True)
        self._is_ready = is_ready

    async def generate(
        self, *, prompt_token_ids: list[int], salt: str | None, params: dict[str, Any], request_id: str
    ) -> AsyncIterator[GenerationChunk]:
        from ray.serve.exceptions import BackPressureError

        from router.serve_adapter import RoutingTimeout

        response = _own_request_context(request_id).run(
            self.handle.generate.remote,
            prompt_token_ids=prompt_token_ids,
            salt=salt,
            params=params,
            request_id=request_id,
        )
        finished = False
        try:
            async for item in response:
                if "refused" in item:
                    raise EngineError.from_dict(item["refused"])
                chunk = GenerationChunk.from_dict(item)
                finished = chunk.finish_reason is not None
                yield chunk
        except (BackPressureError, RoutingTimeout):
            raise EngineError(
                503, "every attention replica is at capacity; retry shortly", None, 1.0
            ) from None
        except EngineError:
            raise
        except Exception as e:  # replica died or was torn down: the request ends retriably
            raise EngineError(
                503, f"attention replica failed ({type(e).__name__}); retry the request", None, 1.0
            ) from e
        finally:
            if not finished:
                response.cancel()

    async def is_ready(self) -> bool:
        return await self._is_ready()
