"""Incremental stop-string matching over streamed text deltas.

Text is released as soon as it can no longer begin a stop string: the matcher holds back the longest
pending suffix that is a prefix of some stop string, so a stop split across tokens is caught and never
partly emitted. On a hit the text before the stop is released and the stop itself is dropped (vLLM's
default, include_stop_str_in_output=False). The stop that completes first in the stream wins, so the
result never depends on how the text was split into deltas. Pure Python; one matcher per request.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    def __init__(self, stops: Sequence[str]) -> None:
        assert all(stops), "stop strings must be non-empty (SamplingParams.validate rejects them)"
        self._stops = tuple(stops)
        # Every proper prefix of every stop: a pending suffix in this set may still become a stop.
        self._prefixes = frozenset(stop[:n] for stop in self._stops for n in range(1, len(stop)))
        self._max_held_chars = max((len(stop) - 1 for stop in self._stops), default=0)
        self._pending = ""
        self._is_stopped = False

    @property
    def is_stopped(self) -> bool:
        return self._is_stopped

    def push(self, text_delta: str) -> tuple[str, bool]:
        """Returns (text safe to emit now, whether a stop string was hit). After a hit every push
        returns ("", True): the request is over."""
        if self._is_stopped:
            return "", True
        text = self._pending + text_delta
        # The pending text holds no whole stop, so every occurrence here is new. The one ending first is
        # what char-by-char deltas would have caught; on a tied end the longer one emits less.
        first_hit: tuple[int, int] | None = None  # (end, start)
        for stop in self._stops:
            start = text.find(stop)
            if start >= 0 and (first_hit is None or (start + len(stop), start) < first_hit):
                first_hit = (start + len(stop), start)
        if first_hit is not None:
            self._pending = ""
            self._is_stopped = True
            return text[: first_hit[1]], True
        num_held = self._num_held(text)
        self._pending = text[len(text) - num_held :]
        return text[: len(text) - num_held], False

    def flush(self) -> str:
        """The held-back text, at the end of the stream (it never completed a stop)."""
        text, self._pending = self._pending, ""
        return text

    def _num_held(self, text: str) -> int:
        for num_chars in range(min(len(text), self._max_held_chars), 0, -1):
            if text[-num_chars:] in self._prefixes:
                return num_chars
        return 0
