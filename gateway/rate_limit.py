"""Per-key request and token rate limits: two token buckets per tenant, refilled continuously.

`admit` charges one request and the prompt's tokens up front; the completion's tokens are charged
when they are known (`charge`), possibly driving the bucket negative so the next request waits.
A refusal says how long until it would fit (the Retry-After of the 429) and which bucket refused.

`Limits` is where the API keeps them: `LocalLimits` in the serving process (exact while one process
serves the API), or a store every API-serving process shares (`cluster.serving.shared_limits`: several
gateway replicas, or the attention replicas of direct streaming), so a key's limit holds for the
whole cluster, not per process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal, Protocol


@dataclass
class _Bucket:
    capacity: float
    refill_per_s: float
    level: float
    updated_s: float

    def refill(self, now_s: float) -> None:
        self.level = min(self.capacity, self.level + (now_s - self.updated_s) * self.refill_per_s)
        self.updated_s = now_s

    def wait_s(self, amount: float) -> float:
        missing = amount - self.level
        return 0.0 if missing <= 0 else missing / self.refill_per_s


@dataclass(frozen=True)
class Refusal:
    wait_s: float  # until the request would fit
    bucket: Literal["requests", "tokens"]  # the bucket that refused (the longer wait)


@dataclass
class RateLimiter:
    requests_per_minute: int | None
    tokens_per_minute: int | None
    _buckets: dict[str, tuple[_Bucket | None, _Bucket | None]] = field(default_factory=dict)

    def _of(self, key: str, now_s: float) -> tuple[_Bucket | None, _Bucket | None]:
        if key not in self._buckets:
            rpm, tpm = self.requests_per_minute, self.tokens_per_minute
            self._buckets[key] = (
                _Bucket(rpm, rpm / 60, rpm, now_s) if rpm else None,
                _Bucket(tpm, tpm / 60, tpm, now_s) if tpm else None,
            )
        for bucket in self._buckets[key]:
            if bucket is not None:
                bucket.refill(now_s)
        return self._buckets[key]

    def admit(self, key: str, num_tokens: int, now_s: float) -> Refusal | None:
        """Charges one request and `num_tokens`; returns None, or the refusal (nothing is charged
        then). A request larger than the whole token bucket is charged the bucket's capacity, so it
        waits for a full bucket rather than forever."""
        requests, tokens = self._of(key, now_s)
        need_tokens = min(num_tokens, tokens.capacity) if tokens else 0
        wait_requests = requests.wait_s(1) if requests else 0.0
        wait_tokens = tokens.wait_s(need_tokens) if tokens else 0.0
        if max(wait_requests, wait_tokens) > 0:
            if wait_requests >= wait_tokens:
                return Refusal(wait_requests, "requests")
            return Refusal(wait_tokens, "tokens")
        if requests:
            requests.level -= 1
        if tokens:
            tokens.level -= need_tokens
        return None

    def charge(self, key: str, num_tokens: int, now_s: float) -> None:
        _, tokens = self._of(key, now_s)
        if tokens:
            tokens.level -= num_tokens


class Limits(Protocol):
    """The API's view of the per-key limits (see the module docstring)."""

    async def admit(self, key: str, num_tokens: int) -> Refusal | None: ...

    def charge(self, key: str, num_tokens: int) -> None:
        """Completion tokens, once known; never waits (a shared store is told in the background)."""
        ...


class LocalLimits:
    """The limits held in this process."""

    def __init__(self, requests_per_minute: int | None, tokens_per_minute: int | None) -> None:
        self.limiter = RateLimiter(requests_per_minute, tokens_per_minute)

    async def admit(self, key: str, num_tokens: int) -> Refusal | None:
        return self.limiter.admit(key, num_tokens, time.monotonic())

    def charge(self, key: str, num_tokens: int) -> None:
        self.limiter.charge(key, num_tokens, time.monotonic())
