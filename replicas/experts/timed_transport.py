"""An `ExpertTransport` decorator that times each MoE layer's round trip (send -> partial outputs
back) for the dispatch-latency metric. Durations are buffered (thread-safe) and drained by the
replica's metrics loop, so the engine thread never touches a metrics backend."""

from __future__ import annotations

import threading
import time

import torch

from replicas.experts.dispatch import ExpertTransport, ShardMessage


class TimedTransport(ExpertTransport):
    def __init__(self, inner: ExpertTransport, max_buffered: int = 10_000) -> None:
        self.inner = inner
        self.is_async = inner.is_async
        self._lock = threading.Lock()
        self._durations_s: list[float] = []
        self._max_buffered = max_buffered

    def send(self, layer: int, messages: list[ShardMessage]) -> object:
        return time.perf_counter(), self.inner.send(layer, messages)

    def wait(self, handle: object) -> list[torch.Tensor]:
        assert isinstance(handle, tuple)
        start, inner = handle
        out = self.inner.wait(inner)
        elapsed = time.perf_counter() - start
        with self._lock:
            if len(self._durations_s) < self._max_buffered:  # an idle metrics loop never grows memory
                self._durations_s.append(elapsed)
        return out

    def drain_durations(self) -> list[float]:
        with self._lock:
            out, self._durations_s = self._durations_s, []
        return out
