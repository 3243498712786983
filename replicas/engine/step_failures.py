"""Whether an engine keeps failing: the unbroken run of failed steps since its last good step.

A failed forward ends that step's requests and the engine goes on (`Engine.step`), so one bad
request never takes a replica down. A replica whose every step fails (a sticky device fault, a
corrupted weight) would pass a thread-alive health check forever while failing each request sent
to it; `FailureRun.stuck_reason` is what its health check reports so Serve replaces it. A run counts
only when it has both several steps and a span in time: a few bad requests in a row, or one failure
followed by idleness, never trip it. Failures of the expert shards are not the replica's and are
not recorded here (`ExpertsUnavailable`; the pool replaces shards). Pure logic, no clock of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_FAILED_STEPS = 5  # failed steps in a row, no good step between them ...
MIN_SPAN_S = 30.0  # ... from the first to the last of them at least this long


@dataclass
class FailureRun:
    num_steps: int = 0
    first_s: float = 0.0
    last_s: float = 0.0
    last_error: str = ""

    def failed(self, now_s: float, error: str) -> None:
        if self.num_steps == 0:
            self.first_s = now_s
        self.num_steps += 1
        self.last_s = now_s
        self.last_error = error

    def succeeded(self) -> None:
        self.num_steps = 0

    def stuck_reason(self) -> str | None:
        """Why the engine counts as broken, or None while it is not."""
        span_s = self.last_s - self.first_s
        if self.num_steps < MIN_FAILED_STEPS or span_s < MIN_SPAN_S:
            return None
        return f"the engine failed its last {self.num_steps} steps over {span_s:.0f} s: {self.last_error}"
