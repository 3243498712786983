"""The async engine front: concurrent streams, cancellation frees KV, bad input raises early."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from mimo.generate import SamplingParams as PlainParams
from mimo.generate import generate
from protocol.messages import Chunk, GenerateRequest
from protocol.sampling import SamplingParams
from replicas.engine.async_engine import AsyncEngine
from replicas.engine.engine import Engine, InvalidRequest
from replicas.engine.engine_config import EngineConfig
from tests.unit.test_engine import NEW_TOKENS, _greedy, _model, _reference, _tokenizer


def _engine() -> AsyncEngine:
    return AsyncEngine(Engine(_model(), _tokenizer(), EngineConfig(block_size=4, max_model_len=200)))


def test_concurrent_streams_match_and_cancel_frees_everything() -> None:
    """Catches streams crossing requests, and a cancelled stream leaking its KV blocks or its engine
    state (a leak of every cancelled request: the soak's RSS creep)."""
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
        assert not engine.engine._live  # a cancelled request leaves nothing behind (it leaked once)
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


def test_a_slow_consumer_gets_the_backlog_as_one_chunk() -> None:
    """Catches a slow consumer paying per token (falling further behind the engine), and merged chunks
    that lose or reorder tokens, text or logprobs, or drop the finish reason and usage."""
    engine = _engine()
    prompt = [5, 6, 7]

    async def consume(delay_s: float) -> list[Chunk]:
        params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, logprobs=2)
        chunks = []
        async for chunk in await engine.submit(GenerateRequest(f"r{delay_s}", prompt, params)):
            chunks.append(chunk)
            await asyncio.sleep(delay_s)  # the engine runs on meanwhile
        return chunks

    try:
        eager = asyncio.run(consume(0.0))
        slow = asyncio.run(consume(0.2))
        assert len(slow) < len(eager) and any(len(c.token_ids) > 1 for c in slow)
        for chunks in (eager, slow):
            tokens = [t for c in chunks for t in c.token_ids]
            assert tokens == _reference(tuple(prompt))
            assert "".join(c.text for c in chunks) == "".join(c.text for c in eager)
            logprobs = [lp for c in chunks if c.logprobs for lp in c.logprobs.logprobs]
            top = [row for c in chunks if c.logprobs for row in c.logprobs.top]
            assert len(logprobs) == len(top) == len(tokens)
            assert [c.finish_reason is not None for c in chunks] == [False] * (len(chunks) - 1) + [True]
            assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == NEW_TOKENS
        assert [lp for c in slow if c.logprobs for lp in c.logprobs.logprobs] == pytest.approx(
            [lp for c in eager if c.logprobs for lp in c.logprobs.logprobs]
        )
    finally:
        engine.shutdown()


def test_paced_stream_sends_a_chunk_per_interval_and_loses_nothing() -> None:
    """Catches pacing that drops or reorders tokens, loses the finish reason or usage, or does not
    pace at all."""
    interval = 0.1
    engine = AsyncEngine(
        Engine(_model(), _tokenizer(), EngineConfig(block_size=4, max_model_len=200)),
        stream_interval_s=interval,
    )
    prompt = [5, 6, 7]

    async def consume() -> list[tuple[float, Chunk]]:
        loop = asyncio.get_running_loop()
        stream = await engine.submit(GenerateRequest("paced", prompt, _greedy(max_tokens=40)))
        return [(loop.time(), chunk) async for chunk in stream]

    try:
        timed = asyncio.run(consume())
    finally:
        engine.shutdown()
    chunks = [c for _, c in timed]
    tokens = [t for c in chunks for t in c.token_ids]
    expected = generate(_model(), prompt, PlainParams(max_new_tokens=40)).token_ids
    assert tokens == expected
    assert chunks[-1].finish_reason is not None and chunks[-1].usage is not None
    assert len(chunks) < len(tokens)  # tokens travelled together
    sent = [t for t, c in timed if c.finish_reason is None]
    assert all(b - a >= 0.9 * interval for a, b in itertools.pairwise(sent))


def test_paced_stream_sends_the_finishing_chunk_without_waiting() -> None:
    """Catches a finishing chunk held back until the pacing interval ends (every non-streaming
    request would pay up to an interval more): the interval is far longer than the generation."""
    interval = 30.0
    engine = AsyncEngine(
        Engine(_model(), _tokenizer(), EngineConfig(block_size=4, max_model_len=200)),
        stream_interval_s=interval,
    )

    async def consume() -> tuple[float, list[Chunk]]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        stream = await engine.submit(GenerateRequest("end", [5, 6, 7], _greedy(max_tokens=6)))
        chunks = [chunk async for chunk in stream]
        return loop.time() - start, chunks

    try:
        elapsed, chunks = asyncio.run(consume())
    finally:
        engine.shutdown()
    assert [t for c in chunks for t in c.token_ids] == generate(
        _model(), [5, 6, 7], PlainParams(max_new_tokens=6)
    ).token_ids
    assert len(chunks) <= 2  # the first token (alone, unless the consumer lagged), then the rest
    assert chunks[-1].finish_reason is not None
    assert elapsed < interval / 2


def test_a_replica_whose_every_step_fails_reports_unhealthy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches a replica that fails every request while its health check (engine thread alive)
    keeps passing, so Serve never replaces it."""
    from types import SimpleNamespace

    from cluster.serving.attention_deployment import AttentionDeployment
    from replicas.engine import step_failures

    monkeypatch.setattr(step_failures, "MIN_SPAN_S", 0.0)
    engine = _engine()
    replica = SimpleNamespace(engine=engine)
    AttentionDeployment.check_health(replica)  # type: ignore[arg-type]
    monkeypatch.setattr(
        engine.engine.runner, "execute", lambda *a: (_ for _ in ()).throw(RuntimeError("xid"))
    )

    async def fail_one(rid: str) -> Chunk:
        chunks = [c async for c in await engine.submit(GenerateRequest(rid, [5, 6, 7], _greedy()))]
        return chunks[-1]

    for k in range(step_failures.MIN_FAILED_STEPS):
        last = asyncio.run(fail_one(f"r{k}"))
        assert last.finish_reason == "error"
    deadline = time.monotonic() + 10  # the snapshot is published just after the chunks go out
    with pytest.raises(RuntimeError, match="xid"):
        while time.monotonic() < deadline:
            AttentionDeployment.check_health(replica)  # type: ignore[arg-type]
            time.sleep(0.05)
    engine.shutdown()
