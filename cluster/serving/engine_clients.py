"""The gateway's two ways to reach an engine: in process (`InProcessEngineClient`, for one-process
runs and fast API tests) and through Serve (`ServeEngineClient`, the cluster). Both go through
`stream_request`, the replica side of one request: admission, validation into a `Refusal`, and the
engine's own `protocol.messages.Chunk`s, which travel to the gateway unchanged.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

from gateway.engine_client import EngineClient, EngineError
from protocol.messages import Chunk, GenerateRequest, Refusal
from replicas.engine.async_engine import AsyncEngine
from replicas.engine.engine import InvalidRequest

# a request whose replica died before its first chunk is sent again this many times
RETRIES_BEFORE_FIRST_CHUNK = 1


class _ReplicaFailed(Exception):
    """The replica serving an attempt failed; its cause is Ray's error."""


async def stream_request(
    engine: AsyncEngine, request: GenerateRequest, max_streams: int
) -> AsyncGenerator[Chunk, None]:
    """Runs one request on `engine`. Raises EngineError before the first chunk: 400 for a bad
    request (field named), 503 with Retry-After when `max_streams` requests are already in."""
    if engine.num_streams >= max_streams:
        raise EngineError(Refusal(503, "attention replica is at capacity; retry shortly", None, 1.0))
    try:
        stream = await engine.submit(request)
    except InvalidRequest as e:
        raise EngineError(Refusal(400, str(e), _api_param(e.field))) from None
    try:
        async for chunk in stream:
            yield chunk
    finally:
        await stream.aclose()  # closed early: the engine aborts the request and frees its KV


def _api_param(field: str) -> str:
    return {"prompt": "messages"}.get(field, field)


class InProcessEngineClient(EngineClient):
    def __init__(self, engine: AsyncEngine, max_streams: int = 1024) -> None:
        self.engine = engine
        self.max_streams = max_streams

    def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        return stream_request(self.engine, request, self.max_streams)

    async def is_ready(self) -> bool:
        return self.engine.is_alive()


class ServeEngineClient(EngineClient):
    """Calls the Attention deployment's `generate(request)`, a Serve stream of `Chunk`s (or one
    `Refusal` first). A replica that dies before the request's first chunk is retried once, on
    whichever replica the router picks then (nothing was sent to the client, so nothing is
    repeated); one that dies after ends the request with a retriable 503, never silently."""

    def __init__(self, handle: Any, is_ready: Callable[[], Awaitable[bool]]) -> None:
        self.handle = handle.options(stream=True)
        self._is_ready = is_ready

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        from ray.exceptions import RayActorError

        for attempt in range(1 + RETRIES_BEFORE_FIRST_CHUNK):
            started = False
            try:
                async for chunk in self._attempt(request, attempt):
                    started = True
                    yield chunk
                return
            except _ReplicaFailed as failed:
                cause = failed.__cause__
                if started or not isinstance(cause, RayActorError) or attempt == RETRIES_BEFORE_FIRST_CHUNK:
                    message = f"attention replica failed ({type(cause).__name__}); retry the request"
                    raise EngineError(Refusal(503, message, None, 1.0)) from cause

    async def _attempt(self, request: GenerateRequest, attempt: int) -> AsyncIterator[Chunk]:
        from ray.serve.exceptions import BackPressureError

        from cluster.serving.ray_private import own_request_context
        from router.serve_adapter import RoutingTimeout

        request_id = request.request_id if attempt == 0 else f"{request.request_id}-retry{attempt}"
        response = own_request_context(request_id).run(self.handle.generate.remote, request)
        finished = False
        try:
            async for item in response:
                if isinstance(item, Refusal):
                    raise EngineError(item)
                assert isinstance(item, Chunk), f"unexpected {type(item).__name__} from a replica"
                finished = item.finish_reason is not None
                yield item
        except (BackPressureError, RoutingTimeout):
            raise EngineError(
                Refusal(503, "every attention replica is at capacity; retry shortly", None, 1.0)
            ) from None
        except (EngineError, GeneratorExit):
            raise
        except Exception as e:  # the replica died or was torn down
            raise _ReplicaFailed() from e
        finally:
            if not finished:
                response.cancel()

    async def is_ready(self) -> bool:
        return await self._is_ready()
