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
    """Running sums over the window: a step costs O(1) (steps leaving the window are subtracted)."""

    def __init__(self, window_s: float = 10.0) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.window_s = window_s
        self._steps: deque[_Step] = deque()
        self._duration_s = 0.0  # of the steps in the window
        self._prefill_tokens = 0  # of the steps in the window that carried prefill
        self._prefill_s = 0.0
        self._prefill_tokens_per_s: float | None = None  # the last window that held a prefill

    def record(self, ended_at: float, duration_s: float, prefill_tokens: int) -> None:
        """One engine step that took `duration_s` and computed `prefill_tokens` prompt tokens."""
        if duration_s < 0 or prefill_tokens < 0:
            raise ValueError(
                f"a step needs duration >= 0 and prefill tokens >= 0, got {duration_s}, {prefill_tokens}"
            )
        self._add(_Step(ended_at, duration_s, prefill_tokens), 1)
        while self._steps[0].ended_at < ended_at - self.window_s:
            self._add(self._steps[0], -1)
        if self._prefill_tokens > 0 and self._prefill_s > 0:  # not float residue of emptied sums
            self._prefill_tokens_per_s = self._prefill_tokens / self._prefill_s

    def _add(self, step: _Step, sign: int) -> None:
        if sign > 0:
            self._steps.append(step)
        else:
            self._steps.popleft()
        self._duration_s += sign * step.duration_s
        if step.prefill_tokens:
            self._prefill_tokens += sign * step.prefill_tokens
            self._prefill_s += sign * step.duration_s

    @property
    def step_s(self) -> float | None:
        return self._duration_s / len(self._steps) if self._steps else None

    @property
    def prefill_tokens_per_s(self) -> float | None:
        return self._prefill_tokens_per_s
