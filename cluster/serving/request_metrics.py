"""Per-request timing seen by an attention replica (arrival, first token, gaps between chunks) and
the recent TTFT window the autoscaler reads; recorded through the shared metric catalog."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from observability.recorder import Metrics
from protocol.messages import Chunk, Usage


@dataclass
class RequestTimer:
    arrival_s: float = field(default_factory=time.monotonic)
    first_s: float | None = None
    last_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)

    def on_chunk(self, chunk: Chunk) -> None:
        now = time.monotonic()
        if chunk.token_ids:
            if self.first_s is None:
                self.first_s = now
            elif self.last_s is not None:
                # a chunk of k tokens (MTP) spreads its gap over them, as vLLM counts inter-token time
                self.gaps_s.extend([(now - self.last_s) / len(chunk.token_ids)] * len(chunk.token_ids))
            self.last_s = now

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_s is None else self.first_s - self.arrival_s


class TTFTWindow:
    """TTFTs of the last `window_s` seconds; p90 for the autoscaler's SLO check."""

    def __init__(self, window_s: float = 30.0) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque()

    def add(self, ttft_s: float, now_s: float) -> None:
        self._samples.append((now_s, ttft_s))

    def p90(self, now_s: float) -> float | None:
        while self._samples and self._samples[0][0] < now_s - self.window_s:
            self._samples.popleft()
        if not self._samples:
            return None
        values = sorted(v for _, v in self._samples)
        return values[min(len(values) - 1, int(0.9 * len(values)))]


def record_finished(metrics: Metrics, timer: RequestTimer, last: Chunk) -> None:
    usage = last.usage or Usage(0, 0, 0)
    metrics.request_finished(
        finished_reason=last.finish_reason or "error",
        num_prompt_tokens=usage.prompt_tokens,
        num_generation_tokens=usage.completion_tokens,
        e2e_s=time.monotonic() - timer.arrival_s,
        ttft_s=timer.ttft_s,
        queue_s=usage.queue_s,
        inter_token_s=timer.gaps_s,
    )
    metrics.prefix_cache(num_queried_tokens=usage.prompt_tokens, num_hit_tokens=usage.cached_tokens)
