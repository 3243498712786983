"""The async engine front: concurrent streams, cancellation frees KV, bad input raises early."""

from __future__ import annotations

import asyncio

import pytest

from replicas.async_engine import AsyncEngine
from replicas.engine import Engine, GenerateRequest, InvalidRequest
from replicas.engine_config import EngineConfig
from tests.unit.test_engine import _greedy, _model, _reference, _tokenizer


def _engine() -> AsyncEngine:
    return AsyncEngine(Engine(_model(), _tokenizer(), EngineConfig(block_size=4, max_model_len=200)))


def test_concurrent_streams_match_and_cancel_frees_blocks() -> None:
    """Catches streams crossing requests, and a cancelled stream leaking its KV blocks."""
    engine = _engine()

    async def collect(rid: str, prompt: list[int]) -> list[int]:
        tokens = []
        async for chunk in await engine.submit(GenerateRequest(rid, prompt, _greedy())):
            tokens += chunk.token_ids
        return tokens

    async def cancel_early() -> None:
        stream = await engine.submit(GenerateRequest("gone", list(range(3, 60)), _greedy(max_tokens=50)))
        async for _ in stream:
            break
        await stream.aclose()

    async def main() -> list[list[int]]:
        results = await asyncio.gather(collect("a", [5, 6, 7]), collect("b", [9, 8, 7, 6, 5]), cancel_early())
        return [results[0], results[1]]

    try:
        a, b = asyncio.run(main())
        assert a == _reference((5, 6, 7)) and b == _reference((9, 8, 7, 6, 5))
        for _ in range(100):
            if not engine.engine.has_work():
                break
            asyncio.run(asyncio.sleep(0.05))
        assert engine.engine.kv_cache.usage()["full"].num_used == 0
    finally:
        engine.shutdown()


def test_invalid_request_raises_before_streaming() -> None:
    """Catches bad input surfacing as a hung stream instead of an immediate error."""
    engine = _engine()

    async def main() -> None:
        await engine.submit(GenerateRequest("bad", [], _greedy()))

    try:
        with pytest.raises(InvalidRequest):
            asyncio.run(main())
    finally:
        engine.shutdown()
