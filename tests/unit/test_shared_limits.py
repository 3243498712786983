"""`SharedLimits`: admission through the shared store, and this process's buckets while the store
cannot be reached (the store itself runs for real in tests/integration/test_direct_streaming.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from cluster.serving.shared_limits import RateLimitsDeployment, SharedLimits
from gateway.rate_limit import LocalLimits, Refusal


class _Method:
    def __init__(self, call: Any) -> None:
        self.call = call

    def remote(self, *args: Any) -> Any:
        return self.call(*args)  # the deployment's coroutine, awaited by the caller


class _Store:
    """The deployment's methods behind handle-shaped `.remote` calls; `down` makes them fail."""

    def __init__(self, store: RateLimitsDeployment) -> None:
        self.down = False
        self.admit = _Method(lambda *a: self._up() or store.admit(*a))
        self.charge = _Method(lambda *a: self._up() or store.charge(*a))

    def _up(self) -> None:
        if self.down:
            raise ConnectionError("store restarting")


def _limits(rpm: int | None, tpm: int | None) -> tuple[SharedLimits, _Store, RateLimitsDeployment]:
    deployment = RateLimitsDeployment(rpm, tpm)
    store = _Store(deployment)
    return SharedLimits(store, LocalLimits(rpm, tpm)), store, deployment  # type: ignore[arg-type]


def test_two_processes_share_one_keys_requests() -> None:
    """Catches buckets kept per process: two processes' clients of one store admit the key's
    limit once between them, and the refusal names the bucket with the wait."""
    deployment = RateLimitsDeployment(3, None)
    first, second = (SharedLimits(_Store(deployment), LocalLimits(3, None)) for _ in range(2))  # type: ignore[arg-type]

    async def run() -> list[Refusal | None]:
        return [await limits.admit("k", 10) for limits in (first, second, first, second)]

    answers = asyncio.run(run())
    assert answers[:3] == [None, None, None]
    assert answers[3] is not None and answers[3].bucket == "requests" and 19 < answers[3].wait_s <= 20


def test_completion_tokens_reach_the_store_without_waiting() -> None:
    """Catches a charge that never reaches the store (the key would never run out of tokens)."""
    limits, _, _ = _limits(None, 100)

    async def run() -> Refusal | None:
        assert await limits.admit("k", 40) is None
        limits.charge("k", 60)  # returns at once; the store is told in the background
        await asyncio.sleep(0)
        await asyncio.gather(*limits._charges)
        return await limits.admit("k", 1)

    refusal = asyncio.run(run())
    assert refusal is not None and refusal.bucket == "tokens"


def test_an_unreachable_store_falls_back_to_this_processs_buckets() -> None:
    """Catches a request failed (or admitted without any limit) because the store is restarting:
    admission and charges go to this process's own buckets meanwhile."""
    limits, store, deployment = _limits(2, None)
    store.down = True

    async def run() -> list[Refusal | None]:
        answers = [await limits.admit("k", 1) for _ in range(3)]
        limits.charge("k", 5)
        await asyncio.gather(*limits._charges)
        return answers

    answers = asyncio.run(run())
    assert answers[:2] == [None, None] and answers[2] is not None
    assert "k" not in deployment.limiter._buckets  # nothing reached the store
