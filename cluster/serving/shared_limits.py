"""Per-key rate limits shared by every process that serves the API: the `RateLimits` deployment
(one replica holding the buckets) and `SharedLimits`, the `gateway.rate_limit.Limits` each serving
process calls it through.

Used when more than one process answers the API and limits are set: several `Gateway` replicas, or
direct streaming, where every `Attention` replica serves the API and a tenant's requests spread
over them by prefix. Kept in each process instead, a key would get its limit once per process.
Admission is one handle call before any engine work; completion tokens are charged without waiting.
When the store cannot be reached, admission falls back to this process's own buckets (so an outage
of the store loosens the limits to per process for its duration, and refuses nobody for it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ray.serve.handle import DeploymentHandle

from gateway.rate_limit import LocalLimits, RateLimiter, Refusal

logger = logging.getLogger(__name__)

RATE_LIMITS = "RateLimits"  # the deployment's name
# Calls the one replica may hold at once (Serve's default is 5): each is microseconds on its event
# loop, and every API-serving process's requests pass through it
MAX_ONGOING_CALLS = 4096


class RateLimitsDeployment:
    """The buckets of every key, in one replica."""

    def __init__(self, requests_per_minute: int | None, tokens_per_minute: int | None) -> None:
        self.limiter = RateLimiter(requests_per_minute, tokens_per_minute)

    async def admit(self, key: str, num_tokens: int) -> Refusal | None:  # async: on the loop, no thread
        return self.limiter.admit(key, num_tokens, time.monotonic())

    async def charge(self, key: str, num_tokens: int) -> None:
        self.limiter.charge(key, num_tokens, time.monotonic())


class SharedLimits:
    """`gateway.rate_limit.Limits` backed by the `RateLimits` deployment."""

    def __init__(self, store: DeploymentHandle, fallback: LocalLimits) -> None:
        self.store = store
        self.fallback = fallback
        self._charges: set[asyncio.Task[Any]] = set()  # in flight; held so they are not collected

    async def admit(self, key: str, num_tokens: int) -> Refusal | None:
        try:
            refusal: Refusal | None = await self.store.admit.remote(key, num_tokens)
            return refusal
        except Exception as e:  # the store restarting or unreachable: never fail the request for it
            logger.warning("rate-limit store unreachable (%s); admitting by this process's limits", e)
            return await self.fallback.admit(key, num_tokens)

    def charge(self, key: str, num_tokens: int) -> None:
        task = asyncio.get_running_loop().create_task(self._charge(key, num_tokens))
        self._charges.add(task)
        task.add_done_callback(self._charges.discard)

    async def _charge(self, key: str, num_tokens: int) -> None:
        try:
            await self.store.charge.remote(key, num_tokens)
        except Exception as e:
            logger.warning("rate-limit store unreachable (%s); charging this process's limits", e)
            self.fallback.charge(key, num_tokens)
