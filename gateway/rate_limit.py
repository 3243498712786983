"""Per-key request and token rate limits: two token buckets per tenant, refilled continuously.

`admit` charges one request and the prompt's tokens up front; the completion's tokens are charged
when they are known (`charge`), possibly driving the bucket negative so the next request waits.
A refusal says how long until it would fit (the Retry-After of the 429).
"""

from __future__ import annotations

from dataclasses import dataclass, field


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


@dataclass
class RateLimiter:
    requests_per_minute: int | None
    tokens_per_minute: int | None
    _buckets: dict[str, tuple[_Bucket | None, _Bucket | None]] = field(default_factory=dict)
    last_refusal: str = ""  # "requests" or "tokens": which bucket refused last (for metrics)

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

    def admit(self, key: str, num_tokens: int, now_s: float) -> float | None:
        """Charges one request and `num_tokens`; returns None, or seconds to wait when refused
        (nothing is charged then). A request larger than the whole token bucket is charged the
        bucket's capacity, so it waits for a full bucket rather than forever."""
        requests, tokens = self._of(key, now_s)
        need_tokens = min(num_tokens, tokens.capacity) if tokens else 0
        wait = max(
            requests.wait_s(1) if requests else 0.0,
            tokens.wait_s(need_tokens) if tokens else 0.0,
        )
        if wait > 0:
            is_requests = requests is not None and requests.wait_s(1) >= wait
            self.last_refusal = "requests" if is_requests else "tokens"
            return wait
        if requests:
            requests.level -= 1
        if tokens:
            tokens.level -= need_tokens
        return None

    def charge(self, key: str, num_tokens: int, now_s: float) -> None:
        _, tokens = self._of(key, now_s)
        if tokens:
            tokens.level -= num_tokens
