"""`ServeEngineClient`'s retry rule, against a stand-in for Serve's streaming handle: a request
whose replica died before its first chunk is sent again once (nothing reached the client yet);
after a chunk, or on a second death, or on an error that is not a replica's death, the request ends
with a retriable 503 and is not repeated."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from ray.exceptions import ActorDiedError
from ray.serve.exceptions import BackPressureError

from cluster.serving.engine_clients import ServeEngineClient
from gateway.engine_client import EngineError
from protocol.messages import Chunk, GenerateRequest
from protocol.sampling import SamplingParams


class _Response:
    """Plays a script: chunks, exceptions to raise, floats to sleep (seconds)."""

    def __init__(self, script: list[object]) -> None:
        self._script = script
        self.cancelled = False

    def __aiter__(self) -> AsyncIterator[object]:
        return self._items()

    async def _items(self) -> AsyncIterator[object]:
        for item in self._script:
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, float):
                await asyncio.sleep(item)
                continue
            yield item

    def cancel(self) -> None:
        self.cancelled = True
        failed = [item for item in self._script if isinstance(item, BackPressureError)]
        if failed:  # as Ray 2.60 does: cancel() re-raises the failed assignment's error
            raise failed[0]


class _Handle:
    """Each call plays the next script: chunks to stream, an exception to raise there."""

    def __init__(self, *scripts: list[object]) -> None:
        self.scripts = list(scripts)
        self.calls: list[GenerateRequest] = []
        self.responses: list[_Response] = []
        self.generate = self

    def options(self, stream: bool) -> _Handle:
        assert stream
        return self

    def remote(self, request: GenerateRequest) -> _Response:
        self.calls.append(request)
        self.responses.append(_Response(self.scripts.pop(0)))
        return self.responses[-1]


def _chunk(token: int, finish: bool = False) -> Chunk:
    return Chunk("r1", [token], f"t{token}", "length" if finish else None)


async def _ready() -> bool:
    return True


def _run(handle: _Handle, max_queue_wait_s: float | None = None) -> tuple[list[Chunk], EngineError | None]:
    async def consume() -> tuple[list[Chunk], EngineError | None]:
        got: list[Chunk] = []
        try:
            async for chunk in ServeEngineClient(handle, _ready, max_queue_wait_s).generate(
                GenerateRequest("r1", [1, 2, 3], SamplingParams(), None)
            ):
                got.append(chunk)
        except EngineError as e:
            return got, e
        return got, None

    return asyncio.run(consume())


def test_a_replica_that_dies_before_the_first_chunk_is_retried_once() -> None:
    """Catches a death before any output failing a request that could have been served."""
    handle = _Handle([ActorDiedError()], [_chunk(5), _chunk(6, finish=True)])
    got, error = _run(handle)
    assert error is None and [c.token_ids for c in got] == [[5], [6]]
    assert len(handle.calls) == 2 and handle.responses[0].cancelled


def test_a_second_death_ends_the_request_with_a_retriable_503() -> None:
    handle = _Handle([ActorDiedError()], [ActorDiedError()])
    got, error = _run(handle)
    assert got == [] and error is not None
    assert (error.refusal.status, error.refusal.retry_after_s) == (503, 1.0)
    assert len(handle.calls) == 2


def test_a_death_after_the_first_chunk_is_not_retried() -> None:
    """Catches a retry that would send the client the first tokens twice."""
    handle = _Handle([_chunk(5), ActorDiedError()], [_chunk(9, finish=True)])
    got, error = _run(handle)
    assert [c.token_ids for c in got] == [[5]]
    assert error is not None and error.refusal.status == 503
    assert len(handle.calls) == 1


@pytest.mark.parametrize("failure", [RuntimeError("bug in the replica"), ValueError("bad")])
def test_an_error_that_is_not_a_replica_death_is_not_retried(failure: Exception) -> None:
    """Catches retrying a request that failed for its own sake (it would fail again)."""
    handle = _Handle([failure], [_chunk(9, finish=True)])
    got, error = _run(handle)
    assert got == [] and error is not None and error.refusal.status == 503
    assert len(handle.calls) == 1
    assert handle.responses[0].cancelled


def test_a_full_queue_is_a_503_with_retry_after_even_when_cancel_reraises() -> None:
    """Catches Serve's backpressure escaping the gateway as a bare 503 without Retry-After (found
    by tests/chaos/test_overload.py): Ray 2.60's cancel() raised the refusal again, over ours."""
    full = BackPressureError(num_queued_requests=9, max_queued_requests=8, status_code=503)
    handle = _Handle([full])
    got, error = _run(handle)
    assert got == [] and error is not None
    assert (error.refusal.status, error.refusal.retry_after_s) == (503, 1.0)
    assert "capacity" in error.refusal.message and handle.responses[0].cancelled


def test_no_first_chunk_within_max_queue_wait_is_a_503_and_the_call_is_cancelled() -> None:
    """Catches a queued request waiting without bound under overload (gateway.max_queue_wait_s)."""
    handle = _Handle([30.0, _chunk(5, finish=True)])
    got, error = _run(handle, max_queue_wait_s=0.2)
    assert got == [] and error is not None
    assert (error.refusal.status, error.refusal.retry_after_s) == (503, 1.0)
    assert "0.2 s" in error.refusal.message and handle.responses[0].cancelled


def test_the_queue_bound_is_on_the_first_chunk_only() -> None:
    """Catches a slow stream being cut once it has started (the bound is for waiting, not decoding)."""
    handle = _Handle([_chunk(5), 0.5, _chunk(6, finish=True)])
    got, error = _run(handle, max_queue_wait_s=0.2)
    assert error is None and [c.token_ids for c in got] == [[5], [6]]
