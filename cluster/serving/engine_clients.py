"""The gateway's two ways to reach an engine: in process (`InProcessEngineClient`, for one-process
runs and fast API tests) and through Serve (`ServeEngineClient`, the cluster). Both go through
`stream_request`, the replica side of one request: admission, validation into a `Refusal`, and the
engine's own `protocol.messages.Chunk`s, which travel to the gateway unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

from gateway.engine_client import EngineClient, EngineError
from protocol.messages import Chunk, GenerateRequest, Refusal
from replicas.engine.async_engine import AsyncEngine
from replicas.engine.engine import InvalidRequest

# a request whose replica died before its first chunk is sent again this many times
RETRIES_BEFORE_FIRST_CHUNK = 1


_AT_CAPACITY = Refusal(503, "every attention replica is at capacity; retry shortly", None, 1.0)


class _ReplicaFailed(Exception):
    """The replica serving an attempt failed; its cause is Ray's error."""


class _FirstChunkLate(Exception):
    """No first chunk by the request's deadline (`max_queue_wait_s`): queued too long."""


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
    repeated); one that dies after ends the request with a retriable 503, never silently. A full
    queue (Serve's backpressure, the router's wait) and a first chunk not there within
    `max_queue_wait_s` (`spec.gateway`) are 503s with Retry-After; the call is cancelled."""

    def __init__(
        self, handle: Any, is_ready: Callable[[], Awaitable[bool]], max_queue_wait_s: float | None = None
    ) -> None:
        self.handle = handle.options(stream=True)
        self._is_ready = is_ready
        self.max_queue_wait_s = max_queue_wait_s  # first chunk within this, or 503 (spec.gateway)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        from ray.exceptions import RayActorError

        wait_s = self.max_queue_wait_s
        deadline_s = None if wait_s is None else time.monotonic() + wait_s  # over both attempts
        for attempt in range(1 + RETRIES_BEFORE_FIRST_CHUNK):
            started = False
            try:
                async for chunk in self._attempt(request, attempt, deadline_s):
                    started = True
                    yield chunk
                return
            except _ReplicaFailed as failed:
                cause = failed.__cause__
                if started or not isinstance(cause, RayActorError) or attempt == RETRIES_BEFORE_FIRST_CHUNK:
                    message = f"attention replica failed ({type(cause).__name__}); retry the request"
                    raise EngineError(Refusal(503, message, None, 1.0)) from cause

    async def _attempt(
        self, request: GenerateRequest, attempt: int, deadline_s: float | None
    ) -> AsyncIterator[Chunk]:
        from ray.serve.exceptions import BackPressureError

        from cluster.serving.ray_private import own_request_context
        from router.serve_adapter import RoutingTimeout

        request_id = request.request_id if attempt == 0 else f"{request.request_id}-retry{attempt}"
        try:  # Serve's router refuses a full queue here already, not only on the first item
            response = own_request_context(request_id).run(self.handle.generate.remote, request)
        except BackPressureError:
            raise EngineError(_AT_CAPACITY) from None
        finished = False
        try:
            items = aiter(response)
            while True:
                try:
                    item = await _next_before(items, deadline_s)
                except StopAsyncIteration:
                    break
                deadline_s = None  # started: the bound is on the wait for the first chunk only
                if isinstance(item, Refusal):
                    raise EngineError(item)
                assert isinstance(item, Chunk), f"unexpected {type(item).__name__} from a replica"
                finished = item.finish_reason is not None
                yield item
        except (BackPressureError, RoutingTimeout):
            raise EngineError(_AT_CAPACITY) from None
        except _FirstChunkLate:
            raise EngineError(
                Refusal(
                    503,
                    f"no attention replica started the request within {self.max_queue_wait_s} s "
                    "(overloaded); retry shortly",
                    None,
                    1.0,
                )
            ) from None
        except (EngineError, GeneratorExit):
            raise
        except Exception as e:  # the replica died or was torn down
            raise _ReplicaFailed() from e
        finally:
            if not finished:
                # Ray 2.60 re-raises a failed assignment's error (backpressure, routing timeout)
                # from cancel(); it would replace the refusal raised above with a bare 503 or a 500
                with contextlib.suppress(Exception):
                    response.cancel()

    async def is_ready(self) -> bool:
        return await self._is_ready()


async def _next_before(items: AsyncIterator[Any], deadline_s: float | None) -> Any:
    """The next item; _FirstChunkLate if it has not come by `deadline_s` (monotonic; None: no bound)."""
    if deadline_s is None:
        return await anext(items)
    try:
        return await asyncio.wait_for(anext(items), max(0.0, deadline_s - time.monotonic()))
    except TimeoutError:
        raise _FirstChunkLate() from None
