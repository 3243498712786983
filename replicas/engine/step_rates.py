"""The engine's measured rates over its recent steps, as routers price a replica with them
(`protocol.report.ReplicaReport.step_s` / `prefill_tokens_per_s`, `router.policy.expected_ttft`).

- `step_s`: mean wall time of the steps that ended within the last `window_s` seconds; a request
  queued behind others waits about one such step per request ahead.
- `prefill_tokens_per_s`: prompt tokens computed per second of the steps that carried any (the
  prefill chunks, decodes beside them included, as a new request's prefill would share a step).

An idle engine keeps its last estimates (a replica does not get faster by waiting); one that has
never stepped, or never prefilled, reports None and routers use their calibrated defaults.
Owned by the engine thread; readers take the two floats from the engine's published snapshot.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class _Step:
    ended_at: float  # monotonic seconds
    duration_s: float
    prefill_tokens: int


class StepRates:
    def __init__(self, window_s: float = 10.0) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.window_s = window_s
        self._steps: deque[_Step] = deque()
        self._step_s: float | None = None
        self._prefill_tokens_per_s: float | None = None

    def record(self, ended_at: float, duration_s: float, prefill_tokens: int) -> None:
        """One engine step that took `duration_s` and computed `prefill_tokens` prompt tokens."""
        if duration_s < 0 or prefill_tokens < 0:
            raise ValueError(
                f"a step needs duration >= 0 and prefill tokens >= 0, got {duration_s}, {prefill_tokens}"
            )
        self._steps.append(_Step(ended_at, duration_s, prefill_tokens))
        while self._steps and self._steps[0].ended_at < ended_at - self.window_s:
            self._steps.popleft()
        self._step_s = sum(s.duration_s for s in self._steps) / len(self._steps)
        prefill_steps = [s for s in self._steps if s.prefill_tokens > 0]
        prefill_time = sum(s.duration_s for s in prefill_steps)
        if prefill_time > 0:
            self._prefill_tokens_per_s = sum(s.prefill_tokens for s in prefill_steps) / prefill_time

    @property
    def step_s(self) -> float | None:
        return self._step_s

    @property
    def prefill_tokens_per_s(self) -> float | None:
        return self._prefill_tokens_per_s
